"""Loading the JIT-built C++ ops (DeepSpeed AIO, the CPU paged-attention kernel) so that a
build never hangs a later run.

torch builds such ops under ``TORCH_EXTENSIONS_DIR`` and guards each build folder with a
``lock`` file that it deletes when done and that any other loader waits on forever. Two
things turned that into hangs here: a process killed mid-build (Ctrl-C, a Slurm time limit)
leaves the file behind, and every virtual environment shares ``~/.cache/torch_extensions``,
so switching environments rebuilds each op (the build flags name the environment's paths)
and widens the window. So:

- the build root defaults to ``<environment>/torch_extensions`` (one per environment) when
  ``TORCH_EXTENSIONS_DIR`` is unset and the environment is writable;
- every load here holds an ``fcntl`` lock on the build folder, which the kernel releases when
  its holder dies; a torch ``lock`` file found while holding it was left by a dead build and
  is removed (with a warning) before torch sees it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


def extensions_root() -> str:
    """Where torch builds and caches this process's C++ ops (sets ``TORCH_EXTENSIONS_DIR``
    to ``<sys.prefix>/torch_extensions`` when unset and that folder can be created)."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ:
        root = os.path.join(sys.prefix, "torch_extensions")
        try:
            os.makedirs(root, exist_ok=True)
        except OSError:
            root = ""
        if root and os.access(root, os.W_OK):
            os.environ["TORCH_EXTENSIONS_DIR"] = root
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return os.environ["TORCH_EXTENSIONS_DIR"]
    from torch.utils.cpp_extension import _get_build_directory

    return os.path.dirname(_get_build_directory("_", verbose=False))


@contextlib.contextmanager
def build_lock(name: str) -> Iterator[str]:
    """Holds the build folder of op ``name`` for this process; yields the folder."""
    folder = os.path.join(extensions_root(), name)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "seesaw.flock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if this process dies
        baton = os.path.join(folder, "lock")
        if os.path.exists(baton):
            warnings.warn(f"removed {baton}, left by a build of {name!r} that was killed; "
                          f"rebuilding", stacklevel=3)
            with contextlib.suppress(FileNotFoundError):
                os.remove(baton)
        try:
            yield folder
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_op(name: str, load: Callable[[], T]) -> T:
    """``load()`` (which JIT-builds op ``name`` if needed) under :func:`build_lock`."""
    with build_lock(name):
        return load()
