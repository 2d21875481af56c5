"""The phase switch as one object: drain -> groups -> model -> KV hand-over.

KV moves through the node's host tier: prefill ranks wrote their ``[layers, all heads]``
slices there during their steps; decode ranks read their ``[layers, heads]`` slices when the
scheduler admits a sequence. The switch's part of the hand-over is the barrier that makes
every rank's writes complete before any rank reads.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch.distributed as dist

from seesaw_mcore import quiet
from seesaw_mcore.config import ParallelConfig
from seesaw_mcore.contract import Phase, SchedulerOutput
from seesaw_mcore.runtime import groups
from seesaw_mcore.runtime.model_runner import ModelRunner

log = logging.getLogger("seesaw_mcore")
_internal = 0  # depth of ``internal_moves``


@contextlib.contextmanager
def internal_moves() -> Iterator[None]:
    """Switches and plan moves made inside it (``plan=auto``'s calibration and trial: the
    planner's measurements, not the job's phases) are logged only with ``runtime.verbose``."""
    global _internal
    _internal += 1
    try:
        yield
    finally:
        _internal -= 1


@dataclass(frozen=True)
class SwitchRecord:
    """One switch, as measured on this rank."""

    phase: Phase  # the phase switched to
    src: str  # layout before
    dst: str  # layout after
    drain_s: float  # the last tier copies, every rank (barrier) and any hand-back swap-out
    rebuild_s: float  # groups + stage rebuilt from the host shards + KV view
    weight_bytes: int  # bytes of the new stage's weights
    copied_bytes: int  # of those, bytes copied host -> device (0 on CPU ranks: views)

    @property
    def seconds(self) -> float:
        return self.drain_s + self.rebuild_s


class Resharder:
    """Switches a ``ModelRunner`` from its live layout to another (the ``Worker`` that owns
    the live plan says which).

    Args:
        runner: this rank's runner.
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner
        self.records: list[SwitchRecord] = []

    def switch(self, dst: ParallelConfig, phase: Phase,
               hand_back: SchedulerOutput | None = None) -> SwitchRecord:
        """Every rank calls this at the same step; returns when this rank runs ``dst``.

        Args:
            dst: the layout to run next.
            phase: the phase it runs (recorded and logged).
            hand_back: this rank's replica's swap-outs of sequences still on the device
                (decode handing back to prefill), run after the barrier under the old layout.
        """
        src = self.runner.info.layout
        t0 = time.perf_counter()
        self.runner.drain()  # this rank's tier copies (async swap-out / prefetch) are done
        dist.barrier()  # drain: every rank's steps, tier writes included, are done
        if hand_back is not None:  # into slots the barrier just released
            self.runner.execute(hand_back)
            self.runner.drain()
        t1 = time.perf_counter()
        copied = self.runner.use(dst)
        groups.accelerator().synchronize()
        t2 = time.perf_counter()
        rec = SwitchRecord(phase, str(src), str(dst), t1 - t0, t2 - t1,
                           self.runner.store.nbytes(dst), copied)
        self.records.append(rec)
        if dist.get_rank() == 0:
            level = logging.DEBUG if _internal and not quiet.verbose() else logging.INFO
            log.log(level, "switch %s -> %s (%s): %.2f ms (drain %.2f, rebuild %.2f), weights "
                    "%.1f MB, copied %.1f MB", src, dst, phase.value, rec.seconds * 1e3,
                    rec.drain_s * 1e3, rec.rebuild_s * 1e3, rec.weight_bytes / 1e6,
                    copied / 1e6)
        return rec
