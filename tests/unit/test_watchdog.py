"""The watchdog's stop requests on one rank (no peers): which signal names the stop."""

from __future__ import annotations

import signal

import pytest

from seesaw_mcore.errors import Interrupted
from seesaw_mcore.runtime.watchdog import Watchdog


@pytest.fixture
def wd():
    dog = Watchdog(rank=0, world=1, interval_s=0.05)
    yield dog
    dog.disarm()


@pytest.mark.parametrize("first,second", [(signal.SIGINT, signal.SIGTERM),
                                          (signal.SIGTERM, signal.SIGINT)])
def test_ctrl_c_and_its_relayed_sigterm_are_one_stop_named_sigint(wd, first, second):
    """Ctrl-C reaches each rank as SIGINT and, from the launcher, as SIGTERM, in either order."""
    wd._on_signal(first, None)
    wd._on_signal(second, None)
    with pytest.raises(Interrupted, match="^interrupted by SIGINT$") as e:
        wd.check_stop()
    assert e.value.exit_code == 130


def test_sigterm_alone_names_sigterm(wd):
    wd.check_stop()  # nothing requested
    wd._on_signal(signal.SIGTERM, None)
    with pytest.raises(Interrupted, match="^interrupted by SIGTERM$"):
        wd.check_stop()
