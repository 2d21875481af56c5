"""Error types: problems a user can fix (bad config, bad checkpoint, bad input) and a stop
requested by a signal."""

import os
import signal
import sys
from collections.abc import Callable


class SeesawError(ValueError):
    """A user-facing error: its message is one line that says what to change.

    Entry points print ``error: <message>`` and exit non-zero instead of a traceback.
    """


class Interrupted(SeesawError):
    """A stop requested by a signal."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal number."""
        return 128 + self.signum


def exit_status(run: Callable[[], int]) -> int:
    """What a launcher exits with: ``run()``'s status, or for a ``SeesawError`` (raised alike
    on every rank) one line ``error: <message>`` from rank 0 and 1 (an ``Interrupted``:
    128 + its signal)."""
    try:
        return run()
    except SeesawError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code if isinstance(e, Interrupted) else 1
