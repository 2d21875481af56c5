"""What a run shows: the progress bar, switch lines, the report and errors. Third-party
noise the engine can silence is silenced here; ``runtime.verbose=true`` shows everything.

Import-time warnings (megatron-core's "Transformer Engine and Apex are not installed", once
per module that checks) are filtered when the package is imported, before anything imports
megatron-core; ``verbose`` turns the filters off again for what is imported later.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator

# (message regex, category) of warnings that say nothing a user of this engine can act on
NOISE = (
    (r"Transformer Engine and Apex are not installed", UserWarning),
    (r".*Apex is not installed", UserWarning),
    (r"Please install Transformer Engine", UserWarning),
    # megatron-core's torch_dist reader calls torch's deprecated name (Megatron checkpoints)
    (r"`load_state_dict` is deprecated", FutureWarning),
)
_VERBOSE = False


def install_filters() -> None:
    """Ignores the known third-party import-time warnings (``NOISE``)."""
    for message, category in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)


def configure(verbose: bool) -> None:
    """Third-party loggers at WARNING (INFO with ``verbose``), and the import-time filters
    removed again with ``verbose``."""
    global _VERBOSE
    _VERBOSE = verbose
    quiet_accelerator_detection()
    level = logging.INFO if verbose else logging.WARNING
    for name in ("DeepSpeed", "megatron", "torch.utils.cpp_extension"):
        logging.getLogger(name).setLevel(level)
    if verbose:
        warnings.filters[:] = [f for f in warnings.filters
                               if not any(f[1] is not None and f[1].pattern == m
                                          for m, _ in NOISE)]


def verbose() -> bool:
    """Whether this process runs with ``runtime.verbose``."""
    return _VERBOSE


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


class _Bar:
    """A tqdm bar over requests; log lines printed meanwhile go above it, not into it."""

    def __init__(self, total: int | None) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
        self._redirect.__enter__()
        self._bar = tqdm(total=total, desc="requests", unit="req", dynamic_ncols=True)

    def update(self, n: int) -> None:
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()
        self._redirect.__exit__(None, None, None)


def progress(total: int | None, enabled: bool):
    """A progress bar over requests (or one that does nothing)."""
    return _Bar(total) if enabled else _NoBar()


@contextlib.contextmanager
def native_output() -> Iterator[None]:
    """Holds back what native code and subprocesses print to this process's stdout/stderr
    (DeepSpeed's op builders print compiler lines there), unless ``verbose``. On an
    exception the held-back output is printed, so nothing a failure explains is lost."""
    if _VERBOSE:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 1)
        os.dup2(held.fileno(), 2)
        try:
            yield
        except BaseException:
            _restore(saved)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            _restore(saved)


def _restore(saved: list[int]) -> None:
    if saved[0] < 0:
        return
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    os.close(saved[0])
    os.close(saved[1])
    saved[0] = saved[1] = -1


def quiet_accelerator_detection() -> None:
    """DeepSpeed warns on every rank when it falls back to its CPU accelerator; name it
    when no CUDA device exists (exactly what it would pick), so it has nothing to say."""
    if "DS_ACCELERATOR" in os.environ:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
