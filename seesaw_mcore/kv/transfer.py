"""Background KV transfers between the paged device cache and the host / disk tiers.

One worker thread per rank runs the copies in submission order (on GPU ranks inside a side
stream that first waits for the compute queued before the submit), so a prefill layer's KV
leaves for the host tier while the next layers compute (the paper's ``stash`` / ``wait_stash``)
and a decode step's admissions come in while the running batch decodes (prefetch). The model
waits (``drain``) only before anything reuses the blocks involved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from seesaw_mcore.contract import DISK, HOST


@dataclass
class TierTraffic:
    """Bytes this rank moved to (out) and from (in) one tier, and the copy time."""

    out_bytes: int = 0
    out_s: float = 0.0
    in_bytes: int = 0
    in_s: float = 0.0

    def add(self, to_tier: bool, nbytes: int, seconds: float) -> None:
        if to_tier:
            self.out_bytes += nbytes
            self.out_s += seconds
        else:
            self.in_bytes += nbytes
            self.in_s += seconds


@dataclass
class TransferStats:
    """This rank's tier traffic and how much of it compute did not wait for.

    Attributes:
        tiers: traffic per tier (``HOST``, ``DISK``).
        busy_s: time the copies took (on the worker, or inline when not async).
        wait_s: time the model waited for them.
    """

    tiers: dict[str, TierTraffic] = field(
        default_factory=lambda: {HOST: TierTraffic(), DISK: TierTraffic()})
    busy_s: float = 0.0
    wait_s: float = 0.0

    @property
    def hidden_s(self) -> float:
        """Copy time overlapped with compute."""
        return max(self.busy_s - self.wait_s, 0.0)

    @property
    def overlap(self) -> float:
        """Fraction of the copy time hidden behind compute (0 when nothing was copied)."""
        return self.hidden_s / self.busy_s if self.busy_s > 0 else 0.0


class CopyQueue:
    """Runs tier copies on a background thread (``async_=True``) or inline.

    Args:
        accelerator: DeepSpeed's accelerator (streams and events on GPU ranks).
        async_: overlap copies with compute; False runs each copy at ``submit``.
    """

    def __init__(self, accelerator, async_: bool = True) -> None:
        self.stats = TransferStats()
        self._acc = accelerator
        self._pool = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="seesaw-kv")
                      if async_ else None)
        gpu = accelerator.device_name() != "cpu"
        self._stream = accelerator.Stream() if gpu and async_ else None
        # The worker thread starts on device 0: it sets this rank's device first, or every
        # rank but 0 would make a CUDA context on GPU 0.
        self._device_index = accelerator.current_device() if gpu else None
        self._device_set = False
        self._pending: list[Future] = []

    @property
    def is_async(self) -> bool:
        return self._pool is not None

    def submit(self, copy: Callable[[], None]) -> None:
        """Queues ``copy`` behind the earlier ones (runs it now when not async)."""
        if self._pool is None:
            t0 = time.perf_counter()
            copy()
            dt = time.perf_counter() - t0
            self.stats.busy_s += dt
            self.stats.wait_s += dt
            return
        event = None
        if self._stream is not None:  # the copy reads what compute queued so far
            event = self._acc.Event()
            event.record()
        self._pending.append(self._pool.submit(self._run, copy, event))

    def _run(self, copy: Callable[[], None], event) -> float:
        t0 = time.perf_counter()
        if self._device_index is not None and not self._device_set:
            self._acc.set_device(self._device_index)
            self._device_set = True
        if self._stream is None:
            copy()
        else:
            with self._acc.stream(self._stream):
                self._stream.wait_event(event)
                copy()
            self._stream.synchronize()
        return time.perf_counter() - t0

    def drain(self) -> None:
        """Waits for every queued copy; re-raises the first copy's error."""
        if not self._pending:
            return
        t0 = time.perf_counter()
        pending, self._pending = self._pending, []
        error = None
        for f in pending:
            try:
                self.stats.busy_s += f.result()
            except BaseException as e:  # noqa: BLE001 - re-raised below, after all finish
                error = error or e
        self.stats.wait_s += time.perf_counter() - t0
        if error is not None:
            raise error

    def close(self) -> None:
        """Finishes queued copies and stops the worker."""
        try:
            self.drain()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
