"""How many KV blocks each layout gets: the configured number, or what memory allows once
the weights are loaded; every rank of every replica agrees on the smallest."""

from __future__ import annotations

import torch
import torch.distributed as dist

from seesaw_mcore import env
from seesaw_mcore.config import CacheConfig, ParallelConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.runtime import groups
from seesaw_mcore.runtime.model_runner import ModelRunner, kv_bytes_per_block


def kv_blocks(runner: ModelRunner, cache: CacheConfig) -> dict[ParallelConfig, int]:
    """Blocks per rank under each layout, the same on every rank: the config's, or what
    memory allows."""
    layouts = runner.layouts
    if cache.num_blocks is not None:
        return {lay: cache.num_blocks for lay in layouts}
    acc = groups.accelerator()
    if acc.device_name() == "cpu":
        budget = cache.kv_cache_gib * 2**30
        _check_host_memory(budget)
    else:  # free memory after the weights, keeping (1 - utilization) of the card spare,
        # and room for the largest layout's weights
        total = acc.total_memory()
        store = runner.store
        extra = max(store.nbytes(lay) for lay in layouts) - store.nbytes(runner.info.layout)
        budget = (acc.available_memory() - (1 - cache.gpu_memory_utilization) * total
                  - extra)
    n = torch.tensor([max(int(budget), 1)], dtype=torch.int64, device=groups.device())
    dist.all_reduce(n, op=dist.ReduceOp.MIN)  # every rank of every replica agrees
    return {lay: max(int(n.item()) // kv_bytes_per_block(
        runner.cfg, lay, cache.block_size, runner.dtype), 1) for lay in layouts}



def _check_host_memory(per_rank_bytes: float) -> None:
    """CPU ranks share the host: refuse a KV budget the node cannot hold."""
    import psutil

    ranks = env.local_world_size()
    avail = psutil.virtual_memory().available
    if per_rank_bytes * ranks > 0.9 * avail:
        raise SeesawError(
            f"cache.kv_cache_gib={per_rank_bytes / 2**30:g} x {ranks} ranks needs "
            f"{per_rank_bytes * ranks / 2**30:.1f} GiB but the node has "
            f"{avail / 2**30:.1f} GiB available; lower cache.kv_cache_gib")
