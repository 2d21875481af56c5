"""How many KV blocks each layout gets: the configured number or budget, or on GPUs what a
profiling run leaves free (vLLM's ``determine_available_memory``); every rank of every
replica agrees on the smallest.

GPU sizing, per rank: every layout's communicators are created and its peak activations
measured by a forward of ``max_prefill_tokens`` prompt tokens plus the sampler over
``max_num_seqs`` rows (the largest step the scheduler sends), with a scratch KV of just
their blocks; then, with PyTorch's cached blocks returned,

    budget = total x gpu_memory_utilization - used - peak activations - extra weights

where ``used`` is everything the card holds now (weights, CUDA context, NCCL buffers, other
processes) and ``extra weights`` the largest layout's shard beyond the live one (a Seesaw
switch loads it while the cache stays).
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seesaw_mcore import env
from seesaw_mcore.config import CacheConfig, ParallelConfig
from seesaw_mcore.contract import SamplingSpec
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.runtime import groups, memory
from seesaw_mcore.runtime.memory import kv_bytes_per_block
from seesaw_mcore.runtime.model_runner import ModelRunner
from seesaw_mcore.runtime.sampler import sample

GIB = 2**30


@dataclass(frozen=True)
class MemoryProfile:
    """One rank's GPU memory at sizing time, in bytes."""

    total: int
    used: int  # everything the device holds with PyTorch's cache returned
    activations: int  # the largest step's peak above the weights and scratch KV
    extra_weights: int  # the largest layout's shard beyond the live one
    utilization: float

    @property
    def budget(self) -> int:
        return int(self.total * self.utilization - self.used - self.activations
                   - self.extra_weights)

    def error(self) -> str:
        gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        return (f"no GPU memory left for the KV cache: {gib(self.total)} x "
                f"gpu_memory_utilization {self.utilization:g} = "
                f"{gib(self.total * self.utilization)}, of which {gib(self.used)} is in use "
                f"(weights, CUDA context, communicators, other processes), "
                f"{gib(self.activations)} is the largest step's activations and "
                f"{gib(self.extra_weights)} another layout's weights; raise "
                f"cache.gpu_memory_utilization, lower scheduler.max_prefill_tokens / "
                f"max_num_seqs, or use more ranks")


def kv_blocks(runner: ModelRunner, cache: CacheConfig, max_tokens: int, max_seqs: int,
              max_model_len: int) -> tuple[dict[ParallelConfig, int], MemoryProfile | None]:
    """Blocks per rank under each layout, the same on every rank (collective), and this
    rank's memory profile when it was measured (GPU ranks without a configured budget).

    Args:
        runner: this rank's runner, weights loaded, no KV cache yet.
        cache: ``num_blocks``, else ``kv_cache_gib``, else (GPU) a profiling run.
        max_tokens / max_seqs: the largest step's prompt tokens and sequences.
        max_model_len: the longest sequence (the profiling run's prompts are no longer).
    """
    layouts = runner.layouts
    if cache.num_blocks is not None:
        return {lay: cache.num_blocks for lay in layouts}, None
    mem, profile = memory.device_memory(), None
    budget = cache.kv_cache_bytes(on_cpu=mem is None)
    if mem is None:
        _check_host_memory(budget)
    elif budget is None:
        profile = profile_memory(runner, mem, cache.gpu_memory_utilization, max_tokens,
                                 max_seqs, max_model_len)
        budget = profile.budget
    smallest = int(budget)
    if dist.get_world_size() > 1:  # every rank of every replica agrees: host data over gloo
        n = torch.tensor([smallest], dtype=torch.int64)  # (one rank: no collective at all)
        dist.all_reduce(n, op=dist.ReduceOp.MIN, group=groups.host_group())
        smallest = int(n.item())
    per_block = {lay: kv_bytes_per_block(runner.cfg, lay, cache.block_size, runner.dtype)
                 for lay in layouts}
    if profile is not None and smallest < max(per_block.values()):
        raise SeesawError(profile.error())  # on every rank (rank 0 reports)
    blocks = {lay: max(smallest // b, 1) for lay, b in per_block.items()}
    if profile is not None and env.is_rank_zero():
        gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        print(f"KV cache: {gib(smallest)} per rank ({gib(profile.total)} x "
              f"{profile.utilization:g} - {gib(profile.used)} in use - "
              f"{gib(profile.activations)} peak activations - {gib(profile.extra_weights)} "
              f"other layouts' weights; smallest rank)", file=sys.stderr)
    return blocks, profile


def profile_memory(runner: ModelRunner, mem: memory.DeviceMemory, utilization: float,
                   max_tokens: int, max_seqs: int, max_model_len: int) -> MemoryProfile:
    """Runs the largest step under every layout (collective; creates their communicators)
    and reads this rank's memory (see the module doc)."""
    start = runner.info.layout
    lens = memory.profile_lengths(max_tokens, max_model_len)
    tables = _block_tables(lens, runner.block_size)
    activations = 0
    for lay in [*[x for x in runner.layouts if x != start], start]:  # end on the live one
        if lay != runner.info.layout:  # (the live stage's weights are on the device already)
            runner.use(lay)
        with runner.scratch_kv(sum(map(len, tables))):
            mem.empty_cache()
            base = mem.allocated()
            mem.reset_peak()
            largest_step(runner, lens, tables, max_seqs)
            activations = max(activations, mem.peak() - base)
    mem.empty_cache()
    store = runner.store
    extra = max(store.nbytes(lay) for lay in runner.layouts) - store.nbytes(start)
    return MemoryProfile(total=mem.total(), used=mem.total() - mem.free(),
                         activations=activations, extra_weights=extra,
                         utilization=utilization)


def _block_tables(lens: list[int], block_size: int) -> list[list[int]]:
    """Block tables for prompts of ``lens`` tokens, over consecutive blocks from 0."""
    tables, first = [], 0
    for n in lens:
        k = -(-n // block_size)
        tables.append(list(range(first, first + k)))
        first += k
    return tables


@torch.inference_mode()
def largest_step(runner: ModelRunner, lens: list[int], tables: list[list[int]],
                 max_seqs: int) -> None:
    """The largest step the scheduler sends (collective over the replica): prompts of
    ``lens`` tokens (KV in ``tables``' blocks) through this rank's stage, then logits and a
    top-p draw for ``max_seqs`` rows on the last stage, as a real step runs them (under
    inference mode)."""
    rows = max(max_seqs, len(lens))
    last = [end - 1 for end in itertools.accumulate(lens)]  # each prompt's last token
    logits = runner.forward([0] * sum(lens), lens, lens, tables,
                            (last * -(-rows // len(lens)))[:rows])  # [R, V] on the last stage
    if logits is not None and runner.info.tp_rank == 0:
        spec = SamplingSpec(temperature=1.0, top_k=0, top_p=0.9, seed=0, token_index=0,
                            logprobs=None)
        sample(logits, list(range(rows)), [spec] * rows)


def _check_host_memory(per_rank_bytes: float) -> None:
    """CPU ranks share the host: refuse a KV budget the node cannot hold."""
    import psutil

    ranks = env.local_world_size()
    avail = psutil.virtual_memory().available
    if per_rank_bytes * ranks > 0.9 * avail:
        raise SeesawError(
            f"cache.kv_cache_gib={per_rank_bytes / GIB:g} x {ranks} ranks needs "
            f"{per_rank_bytes * ranks / GIB:.1f} GiB but the node has "
            f"{avail / GIB:.1f} GiB available; lower cache.kv_cache_gib")
