"""The engine: rank 0 schedules every DP replica and broadcasts each step; every rank runs
its stage; the last stage of each replica sends sampled tokens back to rank 0.

``Engine.run`` is SPMD: every rank calls it with the same requests; rank 0 returns results.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from seesaw_mcore import env
from seesaw_mcore.config import (
    ModelConfig,
    ParallelConfig,
    PhasePlan,
    check_world,
    kv_bytes_per_token,
)
from seesaw_mcore.contract import Phase, RunnerOutput, StepPlan
from seesaw_mcore.engine.phase_scheduler import PhaseScheduler
from seesaw_mcore.engine.request import Sequence
from seesaw_mcore.engine.scheduler import ReplicaSchedulers, SchedulerConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.kv.disk_tier import DiskKVTier, check_disk_path, load_aio, page_tokens
from seesaw_mcore.kv.host_tier import HostKVBuffer
from seesaw_mcore.kv.transfer import TransferStats
from seesaw_mcore.model.loader import Checkpoint
from seesaw_mcore.runtime import cluster, groups
from seesaw_mcore.runtime.model_runner import ModelRunner, kv_bytes_per_block, resolve_dtype
from seesaw_mcore.runtime.reshard import Resharder
from seesaw_mcore.runtime.step_channel import StepChannel, recv_tokens, send_tokens
from seesaw_mcore.runtime.weights import ShardStore


@dataclass(frozen=True)
class CacheConfig:
    """Device KV cache.

    Attributes:
        block_size: tokens per KV block.
        num_blocks: blocks per rank; ``None``: from ``kv_cache_gib`` (CPU) or free memory (GPU).
        kv_cache_gib: KV budget per rank on CPU ranks when ``num_blocks`` is unset.
        gpu_memory_utilization: fraction of GPU memory the engine may use (GPU ranks).
        host_kv_tokens: token slots of the host KV tier (Seesaw plans); ``None``: from
            ``host_kv_gib``.
        host_kv_gib: size of the host KV tier (one shared buffer per node) when
            ``host_kv_tokens`` is unset.
        prefetch_watermark: fraction of device blocks that admitting a sequence from a
            tier must leave free (room for running sequences to grow).
        disk_path: a directory for the disk KV tier (DeepSpeed AIO), used when the host
            tier is full; ``None``: no disk tier.
        disk_kv_tokens: token slots of the disk tier; ``None``: from ``disk_kv_gib``.
        disk_kv_gib: size of the disk tier (one file per node) when ``disk_kv_tokens`` is
            unset.
        async_swap: tier copies run on a background thread, overlapping compute.
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gib: float = 1.0
    gpu_memory_utilization: float = 0.9
    host_kv_tokens: int | None = None
    host_kv_gib: float = 1.0
    prefetch_watermark: float = 0.01
    disk_path: str | None = None
    disk_kv_tokens: int | None = None
    disk_kv_gib: float = 8.0
    async_swap: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise SeesawError(f"cache.block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise SeesawError(f"cache.num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_gib <= 0:
            raise SeesawError(f"cache.kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.host_kv_tokens is not None and self.host_kv_tokens < 1:
            raise SeesawError(f"cache.host_kv_tokens must be >= 1, got {self.host_kv_tokens}")
        if self.host_kv_gib <= 0:
            raise SeesawError(f"cache.host_kv_gib must be > 0, got {self.host_kv_gib}")
        if not 0 <= self.prefetch_watermark < 1:
            raise SeesawError(
                f"cache.prefetch_watermark must be in [0, 1), got {self.prefetch_watermark}")
        if self.disk_kv_tokens is not None and self.disk_kv_tokens < 1:
            raise SeesawError(f"cache.disk_kv_tokens must be >= 1, got {self.disk_kv_tokens}")
        if self.disk_kv_gib <= 0:
            raise SeesawError(f"cache.disk_kv_gib must be > 0, got {self.disk_kv_gib}")


@dataclass
class EngineStats:
    """What the run report prints."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_steps: int = 0
    decode_steps: int = 0
    preemptions: int = 0  # recompute and swap
    swap_preemptions: int = 0  # of those, KV swapped out to a tier and back
    handed_back: int = 0  # sequences swapped out mid-decode for a prefill phase (policy)
    switches: int = 0
    switch_s: float = 0.0
    swap: TransferStats = field(default_factory=TransferStats)  # this rank's tier traffic


@dataclass(frozen=True)
class TraceEvent:
    """One step (or switch) as rank 0 saw it, for timelines."""

    t: float  # seconds since ``run`` started, at the end of the step
    phase: str  # the phase the step ran in (a switch: the phase switched to)
    switch: bool
    num_seqs: int  # sequences in the step
    num_tokens: int  # tokens fed in the step
    tier_usage: float | None  # KV tiers' load (Seesaw plans), see ``PhaseScheduler``


class Engine:
    """Model shards on every rank; schedulers on rank 0.

    Args:
        model: HF model folder.
        plan: a ``PhasePlan`` or one layout string (``"T2"``: a static plan).
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16``.
        cache: device KV cache and host tier settings.
        scheduler: batching budgets.
        max_model_len: longest sequence (prompt + output); default: the model's context.
    """

    def __init__(
        self,
        model: str,
        plan: str | PhasePlan = "T1",
        dtype: str = "auto",
        cache: CacheConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        max_model_len: int | None = None,
    ) -> None:
        self.model_cfg = ModelConfig.from_pretrained(model)
        self.plan = plan if isinstance(plan, PhasePlan) else PhasePlan.parse(plan)
        self.plan.check_model(self.model_cfg)
        self.cache = cache or CacheConfig()
        self.sched_cfg = scheduler or SchedulerConfig()
        self.rank, world = groups.init_distributed()
        try:
            check_world(self.plan.prefill, world)
        except SeesawError as e:
            raise SeesawError(f"{e}{cluster.world_hint()}") from None
        if self.cache.disk_path and self.plan.is_static:
            raise SeesawError(f"cache.disk_path needs a re-sharding plan; plan {self.plan} is "
                              f"static (its KV stays on the device)")
        if not self.plan.is_static and env.local_world_size() != world:
            raise SeesawError(
                f"plan {self.plan}: the host KV tier is per node, so a plan that re-shards "
                f"must run all {world} ranks on one node (this node has "
                f"{env.local_world_size()}); use a static plan across nodes"
                f"{cluster.world_hint()}")
        ctx = self.model_cfg.max_position_embeddings
        self.max_model_len = min(max_model_len or ctx, ctx)
        self.dtype = resolve_dtype(dtype, self.model_cfg)
        store = ShardStore(Checkpoint(self.model_cfg), self.plan, self.rank, self.dtype)
        self.runner = ModelRunner(self.model_cfg, self.plan, self.dtype, self.cache.block_size,
                                  store, self.cache.async_swap)
        self.num_blocks = self._num_blocks()  # after the weights: free memory is known
        self.runner.allocate_kv(self.num_blocks)
        self.host_slots = self.disk_slots = 0
        if not self.plan.is_static:
            self.runner.host = self._open_host_tier()
            self.host_slots = self.runner.host.shape[3]
        if self.cache.disk_path:
            self.runner.disk = self._open_disk_tier()
            self.disk_slots = self.runner.disk.num_slots
        self.phase = Phase.PREFILL
        self.resharder = Resharder(self.runner, self.plan)
        self.stats = EngineStats(swap=self.runner.transfer.stats)
        self.channel = StepChannel(self.runner.device)  # step plans as tensors, no pickle
        # Set to a list to record, on rank 0, one ``TraceEvent`` per step and switch.
        self.trace: list[TraceEvent] | None = None

    @property
    def layout(self) -> ParallelConfig:
        """The active layout."""
        return self.runner.info.layout

    def _num_blocks(self) -> dict[ParallelConfig, int]:
        """Blocks per rank under each layout, the same on every rank: the config's, or what
        memory allows."""
        layouts = {self.plan.prefill, self.plan.decode}
        if self.cache.num_blocks is not None:
            return {lay: self.cache.num_blocks for lay in layouts}
        acc = groups.accelerator()
        if acc.device_name() == "cpu":
            budget = self.cache.kv_cache_gib * 2**30
            _check_host_memory(budget)
        else:  # free memory after the weights, keeping (1 - utilization) of the card spare,
            # and room for the larger of the two layouts' weights
            total = acc.total_memory()
            store = self.runner.store
            extra = max(store.nbytes(lay) for lay in layouts) - store.nbytes(self.layout)
            budget = (acc.available_memory() - (1 - self.cache.gpu_memory_utilization) * total
                      - extra)
        n = torch.tensor([max(int(budget), 1)], dtype=torch.int64, device=groups.device())
        dist.all_reduce(n, op=dist.ReduceOp.MIN)  # every rank of every replica agrees
        return {lay: max(int(n.item()) // kv_bytes_per_block(
            self.model_cfg, lay, self.cache.block_size, self.dtype), 1) for lay in layouts}

    def _kv_token_bytes(self) -> int:
        """Bytes of one token's KV over every layer and KV head."""
        cfg = self.model_cfg
        return int(kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                      self.dtype.itemsize))

    def _open_host_tier(self) -> HostKVBuffer:
        """The node's shared ``/dev/shm`` buffer; nothing is left there even after a crash."""
        cfg = self.model_cfg
        slots = self.cache.host_kv_tokens or int(
            self.cache.host_kv_gib * 2**30 // self._kv_token_bytes())
        shape = (cfg.num_layers, 2, cfg.num_kv_heads, max(slots, 1), cfg.head_dim)
        return self._open_node_file(
            lambda name, create: HostKVBuffer(name, shape, self.dtype, create))

    def _open_disk_tier(self) -> DiskKVTier:
        """The node's disk-tier file under ``cache.disk_path`` (DeepSpeed AIO); every rank
        keeps it open by descriptor, so nothing is left on disk even after a crash."""
        cfg, path = self.model_cfg, self.cache.disk_path
        page = page_tokens(cfg.head_dim, self.dtype)
        slots = self.cache.disk_kv_tokens or int(
            self.cache.disk_kv_gib * 2**30 // self._kv_token_bytes())
        slots -= slots % page
        if slots < page:
            raise SeesawError(f"the disk KV tier needs at least one page of {page} tokens; "
                              f"raise cache.disk_kv_tokens or cache.disk_kv_gib")
        dims = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)

        def make(name: str, create: bool) -> DiskKVTier:
            if create:
                check_disk_path(path, slots * self._kv_token_bytes())
            aio = load_aio()  # the creator builds the op first; the others load it
            return DiskKVTier(os.path.join(path, name + ".bin"), slots, dims, self.dtype,
                              create, aio)

        return self._open_node_file(make)

    def _open_node_file(self, make: Callable):
        """Rank 0 makes a node-shared tier file (``make(name, create=True)``) and broadcasts
        its name or its error; every rank attaches (``make(name, False)``); once all have,
        the name is unlinked (each rank keeps its mapping or descriptor)."""
        box: list = [None, None]
        tier = None
        if self.rank == 0:
            box[0] = f"seesaw_kv_{os.getpid()}_{uuid.uuid4().hex[:8]}"
            try:
                tier = make(box[0], True)
            except SeesawError as e:
                box[1] = str(e)
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise SeesawError(box[1])
        if tier is None:
            tier = make(box[0], False)
        dist.barrier()  # every rank has it open
        tier.unlink()
        return tier

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def capacity_tokens(self) -> int:
        """Longest sequence the device cache holds under every layout."""
        return min(self.num_blocks.values()) * self.cache.block_size

    def run(self, seqs: Iterable[Sequence], after_token: Callable[[Sequence], bool]) -> None:
        """Generates every sequence to completion (SPMD: call on every rank).

        Args:
            seqs: sequences (rank 0's are used; other ranks may pass ``[]``). Pulled lazily:
                the scheduler holds at most ``lookahead`` waiting ones at a time, so an
                iterator over a huge input never has to be in memory at once.
            after_token: called on rank 0 after each sampled token; returns True when the
                sequence is finished (its KV is then freed).
        """
        try:
            if self.is_driver:
                self._drive_and_stop(seqs, after_token)
            else:
                self._work()
        except Exception as e:
            wd = groups.watchdog()
            if wd is not None and _is_comm_error(e):
                wd.exit_if_peer_lost()  # a collective broke: name the rank that is gone
            raise
        self.runner.drain()
        if not self.plan.is_static:
            dist.barrier()  # no rank still touches a tier when the next run starts

    def _drive_and_stop(self, seqs: Iterable[Sequence], after_token) -> None:
        try:
            self._drive(seqs, after_token)
        except BaseException as e:
            wd = groups.watchdog()
            if wd is None or not wd.failed_peers():  # a dead peer: the watchdog reports it
                self.abort(str(e))
            raise
        self.channel.send(StepPlan([], stop=True))

    def abort(self, message: str) -> None:
        """Rank 0, instead of or during ``run``: makes the workers' ``run`` raise
        ``message`` (so no rank waits for a step that never comes)."""
        self.channel.send(StepPlan([], stop=True, error=message))

    def _schedulers(self):
        if self.plan.is_static:
            lay = self.plan.prefill
            return ReplicaSchedulers(self.sched_cfg, lay.dp, lay.pp, self.num_blocks[lay],
                                     self.cache.block_size)
        decode_blocks = self.num_blocks[self.plan.decode]
        disk = self.runner.disk
        return PhaseScheduler(self.sched_cfg, self.plan, self.num_blocks[self.plan.prefill],
                              decode_blocks, self.cache.block_size, self.host_slots, self.phase,
                              int(self.cache.prefetch_watermark * decode_blocks),
                              self.disk_slots, disk.page if disk else 1)

    @property
    def lookahead(self) -> int:
        """Waiting sequences the scheduler is kept topped up with: more than one prefill
        step of every replica can take."""
        return 2 * self.sched_cfg.max_num_seqs * self.plan.prefill.dp

    def _drive(self, seqs: Iterable[Sequence], after_token: Callable[[Sequence], bool]
               ) -> None:
        sched = self._schedulers()
        source = iter(seqs)
        by_id: dict[int, Sequence] = {}  # admitted and not finished

        def top_up() -> None:
            while sched.num_waiting < self.lookahead:
                seq = next(source, None)
                if seq is None:
                    return
                by_id[seq.seq_id] = seq
                sched.add(seq)

        wd = groups.watchdog()
        start = time.perf_counter()
        try:
            while True:
                top_up()
                if not sched.has_work():
                    break
                if wd is not None:
                    wd.check_stop()  # a signal: stop between steps, nothing half done
                step = sched.schedule()
                self.channel.send(step)
                self._mark_phase(step)
                if step.switch_to is not None:
                    self._switch(step)
                    self._record(start, step, sched)
                    continue
                t0 = time.perf_counter()
                outputs = self._execute_and_collect(step.replicas)
                self._account(time.perf_counter() - t0, step)
                self._record(start, step, sched)
                for out in outputs:
                    for tok in out.tokens if out is not None else ():
                        seq = by_id[tok.seq_id]
                        seq.output_token_ids.append(tok.token_id)
                        if seq.params.logprobs is not None:
                            seq.logprobs.append({tok.token_id: tok.logprob, **tok.top_logprobs})
                        if after_token(seq):
                            sched.finish(seq)
                            del by_id[seq.seq_id]
        finally:
            self.stats.preemptions += sched.num_preemptions
            self.stats.swap_preemptions += sched.num_swap_preemptions
            self.stats.handed_back += getattr(sched, "num_handed_back", 0)

    def _mark_phase(self, step: StepPlan) -> None:
        """Tells the watchdog what the job is doing (named if a rank fails meanwhile)."""
        wd = groups.watchdog()
        if wd is None:
            return
        if step.stop:
            wd.set_phase("end", "the end of the run")
        elif step.switch_to is not None:
            src, dst = ((self.plan.decode, self.plan.prefill) if step.switch_to == Phase.PREFILL
                        else (self.plan.prefill, self.plan.decode))
            wd.set_phase("switch", f"the switch {src} -> {dst} ({step.switch_to.value})")
        else:
            kind = self._step_phase(step).value
            wd.set_phase(kind, kind)

    def _step_phase(self, step: StepPlan) -> Phase:
        """The phase a step runs in (a switch: the phase it switches to)."""
        if step.switch_to is not None:
            return step.switch_to
        reps = [r for r in step.replicas if r is not None]
        return reps[0].phase if reps else self.phase

    def _switch(self, step: StepPlan) -> None:
        """Re-shards to ``step.switch_to``; a hand-back's swap-outs (the step's replicas,
        under the old layout) run after the barrier."""
        dp = self.runner.info.dp_rank
        mine = step.replicas[dp] if dp < len(step.replicas) else None
        rec = self.resharder.switch(step.switch_to, mine)
        self.phase = step.switch_to
        self.stats.switches += 1
        self.stats.switch_s += rec.seconds

    def _record(self, start: float, step: StepPlan, sched) -> None:
        if self.trace is None:
            return
        reps = [r for r in step.replicas if r is not None]
        usage = sched.tier_usage() if isinstance(sched, PhaseScheduler) else None
        self.trace.append(TraceEvent(
            time.perf_counter() - start, self._step_phase(step).value,
            step.switch_to is not None,
            sum(len(r.seqs) for r in reps), sum(r.num_tokens for r in reps), usage))

    def _account(self, dt: float, step: StepPlan) -> None:
        st = self.stats
        if any(p is not None and p.phase == Phase.PREFILL for p in step.replicas):
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
                outputs.append(recv_tokens(plan.seqs, src, self.runner.device))
        return outputs

    def _work(self) -> None:
        while True:
            plan = self.channel.recv()
            self._mark_phase(plan)
            if plan.stop:
                if plan.error:
                    raise SeesawError(f"rank 0 failed: {plan.error}")
                return
            if plan.switch_to is not None:
                self._switch(plan)
                continue
            mine = plan.replicas[self.runner.info.dp_rank]
            if mine is None:
                continue
            out = self.runner.execute(mine)
            if out is not None:
                send_tokens(out, mine.seqs, 0, self.runner.device)

    def shutdown(self) -> None:
        """Unmaps the host tier and destroys the process groups."""
        self.close()
        groups.shutdown()

    def close(self) -> None:
        """Stops the copy thread and releases the tiers (the process groups stay up for
        another engine)."""
        runner = self.runner
        try:
            runner.transfer.close()
        finally:
            for tier in (runner.host, runner.disk):
                if tier is not None:
                    tier.close()
            runner.host = runner.disk = None


def _is_comm_error(e: BaseException) -> bool:
    """A collective or point-to-point failure (a peer may be gone), not an engine error."""
    text = str(e)
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection")))


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
