"""The engine: rank 0 schedules every DP replica and broadcasts each step; every rank runs
its stage; the last stage of each replica sends sampled tokens back to rank 0.

``Engine.run`` is SPMD: every rank calls it with the same requests; rank 0 returns results.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from seesaw_mcore.config import ModelConfig, ParallelConfig, check_world
from seesaw_mcore.engine.outputs import Phase, RunnerOutput, StepPlan
from seesaw_mcore.engine.request import Sequence
from seesaw_mcore.engine.scheduler import Scheduler, SchedulerConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.kv.block_pool import BlockPool
from seesaw_mcore.model.loader import Checkpoint
from seesaw_mcore.runtime import groups
from seesaw_mcore.runtime.model_runner import ModelRunner, kv_bytes_per_block, resolve_dtype

@dataclass(frozen=True)
class CacheConfig:
    """Device KV cache.

    Attributes:
        block_size: tokens per KV block.
        num_blocks: blocks per rank; ``None``: from ``kv_cache_gib`` (CPU) or free memory (GPU).
        kv_cache_gib: KV budget per rank on CPU ranks when ``num_blocks`` is unset.
        gpu_memory_utilization: fraction of GPU memory the engine may use (GPU ranks).
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.9

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise SeesawError(f"cache.block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise SeesawError(f"cache.num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_gib <= 0:
            raise SeesawError(f"cache.kv_cache_gib must be > 0, got {self.kv_cache_gib}")


@dataclass
class EngineStats:
    """What the run report prints."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_steps: int = 0
    decode_steps: int = 0
    preemptions: int = 0


class Engine:
    """Model shards on every rank; schedulers on rank 0.

    Args:
        model: HF model folder.
        layout: parallel layout (``"T2"``, ``"P2"``, ``"D2"``...).
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        cache: device KV cache settings.
        scheduler: batching budgets.
        max_model_len: longest sequence (prompt + output); default: the model's context.
    """

    def __init__(
        self,
        model: str,
        layout: str | ParallelConfig = "T1",
        dtype: str = "auto",
        cache: CacheConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.model_cfg = ModelConfig.from_pretrained(model)
        self.layout = layout if isinstance(layout, ParallelConfig) else ParallelConfig.parse(layout)
        self.model_cfg.check_layout(self.layout)
        self.cache = cache or CacheConfig()
        self.sched_cfg = scheduler or SchedulerConfig()
        self.rank, world = groups.init_distributed()
        check_world(self.layout, world)
        ctx = self.model_cfg.max_position_embeddings
        self.max_model_len = min(max_model_len or ctx, ctx)
        ckpt = Checkpoint(self.model_cfg)
        self.dtype = resolve_dtype(dtype, self.model_cfg)
        self.runner = ModelRunner(self.model_cfg, self.layout, self.dtype, None,
                                  self.cache.block_size, ckpt)
        self.num_blocks = self._num_blocks()  # after the weights: free memory is known
        self.runner.allocate_kv(self.num_blocks)
        self.stats = EngineStats()

    def _num_blocks(self) -> int:
        """Blocks per rank, the same on every rank: the config's, or what memory allows."""
        if self.cache.num_blocks is not None:
            return self.cache.num_blocks
        per_block = kv_bytes_per_block(self.model_cfg, self.layout, self.cache.block_size,
                                       self.dtype)
        acc = groups.accelerator()
        if acc.device_name() == "cpu":
            budget = self.cache.kv_cache_gib * 2**30
            _check_host_memory(budget)
        else:  # free memory after the weights, keeping (1 - utilization) of the card spare
            total = acc.total_memory()
            budget = acc.available_memory() - (1 - self.cache.gpu_memory_utilization) * total
        n = torch.tensor([max(int(budget // per_block), 1)], device=groups.device())
        dist.all_reduce(n, op=dist.ReduceOp.MIN)  # every rank of every replica agrees
        return int(n.item())

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def capacity_tokens(self) -> int:
        return self.num_blocks * self.cache.block_size

    def run(self, seqs: list[Sequence], after_token: Callable[[Sequence], bool]) -> None:
        """Generates every sequence to completion (SPMD: call on every rank).

        Args:
            seqs: sequences (rank 0's list is used; other ranks may pass ``[]``).
            after_token: called on rank 0 after each sampled token; returns True when the
                sequence is finished (its blocks are then freed).
        """
        if not self.is_driver:
            self._work()
            return
        try:
            self._drive(seqs, after_token)
        except BaseException as e:
            dist.broadcast_object_list([StepPlan([], stop=True, error=str(e))], src=0)
            raise
        dist.broadcast_object_list([StepPlan([], stop=True)], src=0)

    def _drive(self, seqs: list[Sequence], after_token: Callable[[Sequence], bool]) -> None:
        lay = self.layout
        scheds = [Scheduler(self.sched_cfg, BlockPool(self.num_blocks, self.cache.block_size),
                            lay.pp) for _ in range(lay.dp)]
        by_id = {s.seq_id: s for s in seqs}
        for s in seqs:
            scheds[s.replica].add(s)
        while any(s.has_work() for s in scheds):
            plans = [s.schedule() for s in scheds]
            if not any(plans):
                raise RuntimeError("scheduler stalled with work left (a bug)")
            dist.broadcast_object_list([StepPlan(plans)], src=0)
            t0 = time.perf_counter()
            outputs = self._execute_and_collect(plans)
            dt = time.perf_counter() - t0
            self._account(dt, any(p is not None and p.phase == Phase.PREFILL for p in plans))
            for r, out in enumerate(outputs):
                if out is None:
                    continue
                for tok in out.tokens:
                    seq = by_id[tok.seq_id]
                    seq.output_token_ids.append(tok.token_id)
                    if seq.params.logprobs is not None:
                        seq.logprobs.append({tok.token_id: tok.logprob, **tok.top_logprobs})
                    if after_token(seq):
                        scheds[r].finish(seq)
        self.stats.preemptions += sum(s.num_preemptions for s in scheds)

    def _account(self, dt: float, is_prefill: bool) -> None:
        st = self.stats
        if is_prefill:
            st.prefill_s += dt
            st.prefill_steps += 1
        else:
            st.decode_s += dt
            st.decode_steps += 1

    def _execute_and_collect(self, plans) -> list[RunnerOutput | None]:
        lay = self.layout
        mine = self.runner.execute(plans[0]) if plans[0] is not None else None
        outputs: list[RunnerOutput | None] = []
        for r, plan in enumerate(plans):
            src = lay.rank_of(r, 0, lay.pp - 1)
            if plan is None:
                outputs.append(None)
            elif src == 0:
                outputs.append(mine)
            else:
                box = [None]
                dist.recv_object_list(box, src=src)
                outputs.append(box[0])
        return outputs

    def _work(self) -> None:
        info = self.runner.info
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0)
            plan: StepPlan = box[0]
            if plan.stop:
                if plan.error:
                    raise SeesawError(f"rank 0 failed: {plan.error}")
                return
            mine = plan.replicas[info.dp_rank]
            if mine is None:
                continue
            out = self.runner.execute(mine)
            if out is not None:
                dist.send_object_list([out], dst=0)

    def shutdown(self) -> None:
        groups.shutdown()


def _check_host_memory(per_rank_bytes: float) -> None:
    """CPU ranks share the host: refuse a KV budget the node cannot hold."""
    import psutil

    ranks = groups.local_world_size()
    avail = psutil.virtual_memory().available
    if per_rank_bytes * ranks > 0.9 * avail:
        raise SeesawError(
            f"cache.kv_cache_gib={per_rank_bytes / 2**30:g} x {ranks} ranks needs "
            f"{per_rank_bytes * ranks / 2**30:.1f} GiB but the node has "
            f"{avail / 2**30:.1f} GiB available; lower cache.kv_cache_gib")
