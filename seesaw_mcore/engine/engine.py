"""The engine: rank 0 schedules every DP replica and broadcasts each step; every rank runs
its stage (``runtime/worker.py``); each replica's last stage sends sampled tokens back to
rank 0, which applies them and decides token-level stops.

SPMD: every rank builds the ``Engine``. Rank 0 drives runs (``session`` + ``step``); the
other ranks ``serve`` until rank 0 ends the run.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch.distributed as dist

from seesaw_mcore import env
from seesaw_mcore.config import EngineConfig, ParallelConfig, PhasePlan, check_world
from seesaw_mcore.contract import RunnerOutput, StepPlan
from seesaw_mcore.engine.request import Logprob, SeqStatus, Sequence
from seesaw_mcore.engine.scheduler import PhaseScheduler, ReplicaSchedulers, SchedulerInterface
from seesaw_mcore.engine.stats import EngineStats, StepTiming, TraceEvent
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.kv.tiers import open_disk_tier, open_host_tier
from seesaw_mcore.model.loader import open_checkpoint
from seesaw_mcore.runtime import cluster, groups
from seesaw_mcore.runtime.cuda_graphs import capture_sizes
from seesaw_mcore.runtime.kv_budget import kv_blocks
from seesaw_mcore.runtime.model_runner import ModelRunner, resolve_dtype
from seesaw_mcore.runtime.weights import ShardStore
from seesaw_mcore.runtime.worker import Worker

if TYPE_CHECKING:
    from torch import Tensor


SLEEP_TAGS = ("weights", "kv_cache")  # what wake_up(tags=...) may name (vLLM's)


class Engine:
    """Model shards on every rank; the scheduler and token-level stops on rank 0.

    Args:
        config: the engine's configuration (``plan`` already resolved, not ``auto``): the
            plan it starts on.
        eos_token_ids: ids that end a sequence (besides the model config's).
        candidates: further plans it may move to during a run (``use_plan``): their
            layouts' shards are loaded too (``plan=auto``'s trial).
    """

    def __init__(self, config: EngineConfig, eos_token_ids: Iterable[int] = (),
                 candidates: Iterable[PhasePlan] = ()) -> None:
        self.config = config
        self.model_cfg = config.model.open()
        plan = config.phase_plan()
        self.plans = list(dict.fromkeys([plan, *candidates]))
        for p in self.plans:
            p.check_model(self.model_cfg)
        self.cache, self.sched_cfg = config.cache, config.scheduler
        self.rank, world = groups.init_distributed(config.runtime.dist_timeout_s)
        for p in self.plans:
            self._check_world(p, world)
        ctx = self.model_cfg.max_position_embeddings
        self.max_model_len = min(config.model.max_model_len or ctx, ctx)
        self.model_cfg.check_context(self.max_model_len)
        self.dtype = resolve_dtype(config.dtype, self.model_cfg)
        self.eos_token_ids = set(eos_token_ids) | set(self.model_cfg.eos_token_ids)
        layouts = list(dict.fromkeys(lay for p in self.plans for lay in (p.prefill, p.decode)))
        store = ShardStore(open_checkpoint(self.model_cfg), layouts, self.rank, self.dtype)
        graphs = (not config.runtime.enforce_eager and not self.model_cfg.num_experts
                  and (groups.device().type == "cuda" or env.decode_padding()))
        # (MoE layers group tokens by expert with host-side counts: not capturable yet)
        self.runner = ModelRunner(self.model_cfg, plan, self.dtype, self.cache.block_size,
                                  store, self.cache.async_swap, layouts,
                                  capture_sizes(self.sched_cfg.max_num_seqs) if graphs else None,
                                  self.max_model_len)
        if len(self.plans) > 1 and self.runner.device.type == "cpu":
            for lay in layouts:  # CPU stages view the store: build them all now, not mid-run
                self.runner.use(lay)
            self.runner.use(plan.prefill)
        self.num_blocks, self.memory_profile = kv_blocks(  # after the weights; GPUs: profiled
            self.runner, self.cache, max(self.sched_cfg.max_prefill_tokens, self.max_model_len),
            self.sched_cfg.max_num_seqs, self.max_model_len)
        self.runner.allocate_kv(self.num_blocks)
        copier = self.runner.copier
        if not all(p.is_static for p in self.plans):
            copier.host = open_host_tier(self.model_cfg, self.cache, self.dtype)
        if self.cache.disk_path:
            copier.disk = open_disk_tier(self.model_cfg, self.cache, self.dtype)
        self.host_slots = copier.host.shape[3] if copier.host is not None else 0
        self.disk_slots = copier.disk.num_slots if copier.disk is not None else 0
        self.worker = Worker(self.runner, plan)
        self.stats = EngineStats(swap=self.runner.transfer.stats)
        # Set to a list to record, on rank 0, one ``TraceEvent`` per step and switch.
        self.trace: list[TraceEvent] | None = None
        self.last_step: StepTiming | None = None  # rank 0: the last step's timing
        self.scheduler: SchedulerInterface | None = None  # during a run, on rank 0
        # A static plan's block pools between runs: cached prefixes stay findable (rank 0)
        self._pools: tuple[PhasePlan, list] | None = None
        self._seqs: dict[int, Sequence] = {}  # added and not finished
        self._asleep: set[str] = set()  # what sleep() freed and wake_up() has not restored
        self._sleep_blocks: dict[ParallelConfig, int] = {}
        self._t0 = 0.0

    def _check_world(self, plan: PhasePlan, world: int) -> None:
        try:
            check_world(plan.prefill, world)
        except SeesawError as e:
            raise SeesawError(f"{e}{cluster.world_hint()}") from None
        if self.cache.disk_path and all(p.is_static for p in self.plans):
            raise SeesawError(f"cache.disk_path needs a re-sharding plan; plan {plan} is "
                              f"static (its KV stays on the device)")
        if not plan.is_static and env.local_world_size() != world:
            raise SeesawError(
                f"plan {plan}: the host KV tier is per node, so a plan that re-shards "
                f"must run all {world} ranks on one node (this node has "
                f"{env.local_world_size()}); use a static plan across nodes"
                f"{cluster.world_hint()}")

    @property
    def plan(self) -> PhasePlan:
        """The plan the ranks run now."""
        return self.worker.plan

    @property
    def layout(self) -> ParallelConfig:
        """The active layout."""
        return self.runner.info.layout

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    @property
    def lookahead(self) -> int:
        """Waiting sequences a run keeps the scheduler topped up with: more than one prefill
        step of every replica can take."""
        return 2 * self.sched_cfg.max_num_seqs * self.plan.prefill.dp

    def capacity_tokens(self) -> int:
        """Longest sequence the device cache holds under every layout."""
        return min(self.num_blocks.values()) * self.cache.block_size

    def check_request(self, label: str, prompt_len: int, max_tokens: int | None) -> int:
        """The resolved ``max_tokens`` of a prompt of ``prompt_len`` tokens, if it fits the
        model's context, the device cache and the tiers (else a one-line error)."""
        if prompt_len >= self.max_model_len:
            raise SeesawError(
                f"{label} has {prompt_len} tokens; the model's context is "
                f"{self.max_model_len} (prompt + at least one generated token must fit)")
        max_tokens = min(max_tokens or self.max_model_len, self.max_model_len - prompt_len)
        need, cap = prompt_len + max_tokens, self.capacity_tokens()
        if need > cap:
            raise SeesawError(
                f"{label} needs up to {need} tokens of KV cache (prompt {prompt_len} + "
                f"max_tokens {max_tokens}) but the cache holds {cap}; "
                "raise cache.num_blocks / cache.kv_cache_gib or lower max_tokens")
        host, disk = self.host_slots, self.disk_slots
        if host and need - 1 > max(host, disk):
            holds = f"it holds {host}" + (f" and the disk tier {disk}" if disk else "")
            raise SeesawError(
                f"{label} needs up to {need - 1} token slots of the host KV tier (prompt "
                f"{prompt_len} + max_tokens {max_tokens} - 1, if preempted) but {holds}; "
                "raise cache.host_kv_tokens / cache.host_kv_gib or lower max_tokens")
        return max_tokens

    # -- a run, on rank 0 -------------------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[Engine]:
        """Rank 0: one run. Inside, ``add`` sequences and call ``step`` while
        ``has_unfinished``; on exit the workers' ``serve`` returns (or raises rank 0's
        error, so no rank waits for a step that never comes)."""
        self.scheduler, self._seqs = self._make_scheduler(), {}
        self._t0 = time.perf_counter()
        try:
            yield self
        except BaseException as e:
            try:
                wd = groups.watchdog()
                if wd is None or not wd.failed_peers():  # a dead peer: the watchdog says so
                    self.worker.stop(str(e))
            finally:
                self.stats.add_scheduler(self.scheduler)
                self.scheduler = None
                if isinstance(e, Exception):
                    _exit_if_peer_lost(e)
            raise
        self.worker.stop()
        self.stats.add_scheduler(self.scheduler)
        if isinstance(self.scheduler, ReplicaSchedulers):  # no sequence left: no user
            self._pools = (self.plan, [s.pool for s in self.scheduler.replicas])
        self.scheduler = None
        self._end_run()

    def add(self, seq: Sequence) -> None:
        """Queues a sequence (its replica: by its request's index)."""
        seq.replica = seq.request_index % self.plan.prefill.dp
        p = seq.params
        if p.min_tokens:  # what may not end it early: banned in the sampler until then
            ids = set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)
            vocab = self.model_cfg.vocab_size
            seq.min_tokens_banned = tuple(sorted(i for i in ids if 0 <= i < vocab))
        self._seqs[seq.seq_id] = seq
        self.scheduler.add(seq)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Sequence]:
        """Schedule -> broadcast -> execute -> update.

        Returns:
            The sequences that got a token this step; those a token-level stop ended have
            ``finish_reason`` set and their KV freed.
        """
        wd = groups.watchdog()
        if wd is not None:
            wd.check_stop()  # a signal: stop between steps, nothing half done
        step = self.scheduler.schedule()
        self.worker.channel.send(step)
        t0 = time.perf_counter()
        result = self.worker.execute(step)
        if step.switch_to is not None:
            self._record(step, result.seconds)
            return []
        outputs = self.worker.collect(step, result)
        self._record(step, time.perf_counter() - t0)
        return self._update(outputs)

    def use_plan(self, plan: PhasePlan) -> None:
        """Rank 0, between steps of a run: every rank moves to ``plan`` (one the engine
        was built with) through the re-sharding machinery, and a new scheduler takes every
        unfinished sequence. They keep their tokens; those with KV recompute it (counted as
        preemptions)."""
        if plan not in self.plans:
            raise SeesawError(f"plan {plan} is not one this engine was built for "
                              f"({', '.join(map(str, self.plans))})")
        step = StepPlan([], use_plan=plan.to_string())
        self.worker.channel.send(step)
        record = self.worker.execute(step)
        self._record(step, record.seconds)
        old, self.scheduler = self.scheduler, self._make_scheduler()
        self.stats.add_scheduler(old)
        for seq in sorted(self._seqs.values(), key=lambda s: s.seq_id):
            if seq.status != SeqStatus.WAITING:
                seq.num_preemptions += 1
                self.stats.preemptions += 1
            seq.block_table, seq.status = [], SeqStatus.WAITING
            seq.replica = seq.request_index % plan.prefill.dp
            self.scheduler.add(seq)

    def reset_prefix_cache(self) -> None:
        """Rank 0, between runs: forgets every cached prefix (vLLM's
        ``reset_prefix_cache``; needed when the weights change)."""
        self._pools = None

    def update_weights(self, weights: list[tuple[str, Tensor]]) -> int:
        """Every rank, between runs: writes new weights into every copy this rank holds (see
        ``ModelRunner.update_weights``) and forgets the prefix cache, whose KV came from the
        old weights. ``weights`` must be checked (``loader.check_update``)."""
        if self._seqs:
            raise SeesawError("update_weights during a run: call it between generate calls")
        if "weights" in self._asleep:
            raise SeesawError("update_weights while asleep: call wake_up() (or "
                              "wake_up(tags=['weights'])) first")
        n = self.runner.update_weights(weights)
        self.reset_prefix_cache()
        return n

    def sleep(self, level: int = 1) -> None:
        """Every rank, between runs: frees the device KV cache and device weights (level 1;
        the host shards stay) or also the host shards (level 2). See ``LLM.sleep``."""
        if self._seqs:
            raise SeesawError("sleep during a run: call it between generate calls")
        if level not in (1, 2):
            raise SeesawError(f"sleep: level must be 1 or 2, got {level!r}")
        if self._asleep:
            return
        self._sleep_blocks = self.runner.sleep(level)
        self.reset_prefix_cache()  # the cached prefixes' KV is gone
        self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: Iterable[str] | None = None) -> None:
        """Every rank: allocates what ``sleep`` freed (``tags``: ``"weights"`` and/or
        ``"kv_cache"``; default both)."""
        tags = set(SLEEP_TAGS if tags is None else tags)
        unknown = sorted(tags - set(SLEEP_TAGS))
        if unknown:
            raise SeesawError(f"wake_up: unknown tags {unknown}; known: {list(SLEEP_TAGS)}")
        if "weights" in tags & self._asleep:
            self.runner.wake_weights()
        if "kv_cache" in tags & self._asleep:
            self.runner.wake_kv(self._sleep_blocks)
        self._asleep -= tags

    def check_ready(self) -> None:
        """Raises unless ``generate`` can run: awake, and after a level-2 sleep, every
        weight written again."""
        if self._asleep:
            raise SeesawError(f"the engine is asleep ({', '.join(sorted(self._asleep))} "
                              "freed by sleep()); call wake_up() first")
        missing = self.runner.store.missing
        if missing:
            raise SeesawError(f"the weights were discarded by sleep(level=2): "
                              f"{len(missing)} shard tensors have no values yet; call "
                              "update_weights with every parameter before generate")

    def finish(self, seq: Sequence) -> None:
        """Ends a sequence (a stop string found by the output processor) and frees its KV."""
        self.scheduler.finish(seq)
        del self._seqs[seq.seq_id]

    def _update(self, outputs: list[RunnerOutput | None]) -> list[Sequence]:
        touched = []
        for out in outputs:
            for tok in out.tokens if out is not None else ():
                seq = self._seqs[tok.seq_id]
                seq.output_token_ids.append(tok.token_id)
                if seq.params.logprobs is not None:  # the sampled token first, as vLLM
                    entry = {tok.token_id: Logprob(tok.logprob, tok.rank)}
                    for r, (tid, lp) in enumerate(tok.top_logprobs.items(), 1):
                        entry.setdefault(tid, Logprob(lp, r))
                    seq.logprobs.append(entry)
                    seq.cumulative_logprob += tok.logprob
                if tok.prompt_rows is not None:
                    seq.prompt_logprobs = _prompt_entries(seq, tok.prompt_rows)
                if self._check_stop(seq):
                    self.finish(seq)
                touched.append(seq)
        return touched

    def _check_stop(self, seq: Sequence) -> bool:
        """Token-level stops: a stop token, EOS, ``max_tokens``, the model's context."""
        p, tok = seq.params, seq.output_token_ids[-1]
        if tok in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", tok
        elif not p.ignore_eos and tok in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif (len(seq.output_token_ids) >= seq.max_tokens
              or seq.num_tokens >= self.max_model_len):
            seq.finish_reason = "length"
        return seq.finish_reason is not None

    def _make_scheduler(self) -> SchedulerInterface:
        if self.plan.is_static:
            lay = self.plan.prefill
            pools, self._pools = self._pools, None
            return ReplicaSchedulers(self.sched_cfg, lay.dp, lay.pp, self.num_blocks[lay],
                                     self.cache.block_size, self.cache.enable_prefix_caching,
                                     pools[1] if pools and pools[0] == self.plan else None)
        decode_blocks = self.num_blocks[self.plan.decode]
        disk = self.runner.copier.disk
        return PhaseScheduler(self.sched_cfg, self.plan, self.num_blocks[self.plan.prefill],
                              decode_blocks, self.cache.block_size, self.host_slots,
                              self.worker.phase,
                              int(self.cache.prefetch_watermark * decode_blocks),
                              self.disk_slots, disk.page if disk else 1,
                              self.cache.enable_prefix_caching)

    def _record(self, step: StepPlan, seconds: float) -> None:
        """Counts the step (or switch) in the stats, ``last_step`` and the trace."""
        switch = step.switch_to is not None or step.use_plan is not None
        if switch:
            self.stats.add_switch(seconds)
        else:
            self.stats.add_step(step, seconds)
        phase = self.worker.step_phase(step)
        self.last_step = StepTiming(phase, switch, seconds, step)
        if self.trace is not None:  # per-step sums only when tracing (O(batch))
            reps = [r for r in step.replicas if r is not None]
            self.trace.append(TraceEvent(
                time.perf_counter() - self._t0, phase.value, switch,
                sum(len(r.seqs) for r in reps), sum(r.num_tokens for r in reps),
                self.scheduler.tier_usage()))

    # -- the other ranks --------------------------------------------------------------

    def serve(self) -> None:
        """Ranks other than 0: run rank 0's steps until it ends the run."""
        try:
            self.worker.serve()
        except Exception as e:
            _exit_if_peer_lost(e)
            raise
        self._end_run()

    def _end_run(self) -> None:
        self.runner.drain()
        if not self.plan.is_static:
            dist.barrier()  # no rank still touches a tier when the next run starts

    def shutdown(self) -> None:
        """Unmaps the tiers and destroys the process groups."""
        self.close()
        groups.shutdown()

    def close(self) -> None:
        """Stops the copy thread and releases the tiers (the process groups stay up for
        another engine)."""
        copier = self.runner.copier
        try:
            self.runner.transfer.close()
        finally:
            for tier in (copier.host, copier.disk):
                if tier is not None:
                    tier.close()
            copier.host = copier.disk = None
            self.runner.release()  # the device KV cache and weights, back to the driver


def _prompt_entries(seq: Sequence, rows: list[list[float]]) -> list[dict[int, Logprob] | None]:
    """Per prompt position, its logprob entry (``None`` for the first position and before
    ``prompt_logprobs_from``). ``rows`` cover the positions after the prefill's cached
    prefix, up to the last."""
    first = len(seq.prompt_token_ids) - len(rows)
    start = seq.params.prompt_logprobs_from
    return [None] * first + [_logprob_entry(r) if first + i >= start else None
                             for i, r in enumerate(rows)]


def _logprob_entry(row: list[float]) -> dict[int, Logprob]:
    """``[actual id, logprob, rank, k ids, k logprobs]`` -> ``{id: Logprob}``, the actual
    token first (vLLM's prompt-logprob entry)."""
    k = (len(row) - 3) // 2
    entry = {int(row[0]): Logprob(row[1], int(row[2]))}
    for r, (tid, lp) in enumerate(zip(row[3:3 + k], row[3 + k:]), 1):
        entry.setdefault(int(tid), Logprob(lp, r))
    return entry


def _exit_if_peer_lost(e: Exception) -> None:
    """A collective broke: let the watchdog name the rank that is gone (it exits)."""
    wd = groups.watchdog()
    if wd is not None and _is_comm_error(e):
        wd.exit_if_peer_lost()


def _is_comm_error(e: BaseException) -> bool:
    """A collective or point-to-point failure (a peer may be gone), not an engine error."""
    text = str(e)
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection")))
