"""Schedulers: the interface (``base``), static plans (``static``), Seesaw plans (``seesaw``,
with its tiers' book ``tier_book``), the batching code they share (``batching``), and which
one a plan gets (``make_scheduler``)."""

from __future__ import annotations

from seesaw_mcore.config import CacheConfig, ParallelConfig, PhasePlan, SchedulerConfig
from seesaw_mcore.contract import Phase
from seesaw_mcore.engine.scheduler.base import SchedulerInterface
from seesaw_mcore.engine.scheduler.seesaw import PhaseScheduler
from seesaw_mcore.engine.scheduler.static import ReplicaScheduler, ReplicaSchedulers
from seesaw_mcore.kv.block_pool import BlockPool


def make_scheduler(plan: PhasePlan, config: SchedulerConfig, cache: CacheConfig,
                   num_blocks: dict[ParallelConfig, int], phase: Phase, host_slots: int,
                   disk_slots: int, disk_page: int, pools: list[BlockPool] | None = None
                   ) -> SchedulerInterface:
    """A run's scheduler for ``plan``: per-replica schedulers for a static plan (over
    ``pools``, an earlier run's of the same plan, when given), else the Seesaw scheduler,
    starting in ``phase``, over the tiers' slots (the disk tier's in pages of
    ``disk_page`` tokens)."""
    if plan.is_static:
        lay = plan.prefill
        return ReplicaSchedulers(config, lay.dp, lay.pp, num_blocks[lay], cache.block_size,
                                 cache.enable_prefix_caching, pools)
    decode_blocks = num_blocks[plan.decode]
    return PhaseScheduler(config, plan, num_blocks[plan.prefill], decode_blocks,
                          cache.block_size, host_slots, phase,
                          int(cache.prefetch_watermark * decode_blocks), disk_slots, disk_page,
                          cache.enable_prefix_caching)


__all__ = ["PhaseScheduler", "ReplicaScheduler", "ReplicaSchedulers", "SchedulerInterface",
           "make_scheduler"]
