"""JIT-built ops never hang a run: a ``lock`` left by a killed build is removed, a loader
killed while holding the build folder releases it, and the build root is per environment."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from seesaw_mcore import jit_ops


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    return tmp_path


def test_a_stale_torch_lock_is_removed_with_a_warning(root):
    (root / "op").mkdir()
    (root / "op" / "lock").touch()  # what a build killed mid-way leaves
    with pytest.warns(UserWarning, match=r"removed .*/op/lock, left by a build of 'op' that "
                                         r"was killed; rebuilding"):
        assert jit_ops.load_op("op", lambda: 42) == 42
    assert not (root / "op" / "lock").exists()


def test_a_loader_killed_mid_build_does_not_block_the_next(root):
    code = ("import sys, time; from seesaw_mcore import jit_ops\n"
            "with jit_ops.build_lock('op'):\n"
            "    open(sys.argv[1] + '/op/lock', 'w').close(); print('held', flush=True)\n"
            "    time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, TORCH_EXTENSIONS_DIR=str(root)))
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    start = time.monotonic()
    with pytest.warns(UserWarning, match="left by a build of 'op' that was killed"):
        assert jit_ops.load_op("op", lambda: "loaded") == "loaded"
    assert time.monotonic() - start < 5


def test_the_build_root_defaults_to_the_environment(monkeypatch):
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    assert jit_ops.extensions_root() == os.path.join(sys.prefix, "torch_extensions")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == os.path.join(sys.prefix, "torch_extensions")
