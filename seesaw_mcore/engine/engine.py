"""The engine: rank 0 schedules every DP replica and broadcasts each step; every rank runs
its stage (``runtime/worker.py``); each replica's last stage sends sampled tokens back to
rank 0, which applies them and decides token-level stops.

SPMD: every rank builds the ``Engine``. Rank 0 drives runs (``session`` + ``step``); the
other ranks ``serve`` until rank 0 ends the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch.distributed as dist

from seesaw_mcore.config import EngineConfig, ParallelConfig, PhasePlan
from seesaw_mcore.contract import Control, Phase, RunnerOutput, Step, Switch
from seesaw_mcore.engine.adapters import LORA_CONTROLS, Adapters, Resident
from seesaw_mcore.engine.request import SeqStatus, Sequence
from seesaw_mcore.engine.routed import RoutedExperts
from seesaw_mcore.engine.scheduler import ReplicaSchedulers, SchedulerInterface, make_scheduler
from seesaw_mcore.engine.stats import EngineStats, StepTiming, TraceEvent
from seesaw_mcore.engine.tokens import append_token, min_tokens_banned, token_stop
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.kv.block_pool import cache_root
from seesaw_mcore.model.loader import open_checkpoint
from seesaw_mcore.model.lora import LoRARequest
from seesaw_mcore.runtime import cluster, groups
from seesaw_mcore.runtime.dtype import resolve_dtype
from seesaw_mcore.runtime.executor import Executor

if TYPE_CHECKING:
    from torch import Tensor


# the architecture facts a checkpoint must share with the engine's to replace its weights
SHAPE_FIELDS = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers",
                "num_heads", "num_kv_heads", "head_dim", "tie_word_embeddings", "qkv_bias",
                "qk_norm", "num_experts", "num_experts_per_tok", "expert_intermediate_size",
                "moe_layers")


class Engine:
    """Model shards on every rank; the scheduler and token-level stops on rank 0.

    Args:
        config: the engine's configuration.
        eos_token_ids: ids that end a sequence (besides the model config's).
        plans: the plan to start on, then further plans it may move to during a run
            (``use_plan``; their layouts' shards are loaded too: ``plan=auto``'s trial).
            Default: the configured plan (``config.plan``, not ``auto``).
    """

    def __init__(self, config: EngineConfig, eos_token_ids: Iterable[int] = (),
                 plans: Iterable[PhasePlan] = ()) -> None:
        self.config = config
        self.model_cfg = config.model.open()
        if config.enable_return_routed_experts and not self.model_cfg.num_experts:
            raise SeesawError(f"enable_return_routed_experts needs a mixture-of-experts model; "
                              f"{self.model_cfg.architecture} has no experts")
        self.plans = list(dict.fromkeys(plans)) or [config.phase_plan()]
        for p in self.plans:
            self.model_cfg.check_plan(p)
        self.cache, self.sched_cfg = config.cache, config.scheduler
        self.rank, world = groups.init_distributed(config.runtime.dist_timeout_s)
        cluster.check_plans_fit(self.plans, world, bool(self.cache.disk_path))
        ctx = self.model_cfg.max_position_embeddings
        self.max_model_len = min(config.model.max_model_len or ctx, ctx)
        self.model_cfg.check_context(self.max_model_len)
        self.dtype = resolve_dtype(config.dtype, self.model_cfg)
        self.eos_token_ids = set(eos_token_ids) | set(self.model_cfg.eos_token_ids)
        self.executor = Executor(config, self.model_cfg, self.plans, self.rank, self.dtype,
                                 self.max_model_len)
        self.num_blocks = self.executor.num_blocks
        self.stats = EngineStats(swap=self.executor.tier_traffic)
        # Set to a list to record, on rank 0, one ``TraceEvent`` per step and switch.
        self.trace: list[TraceEvent] | None = None
        self.last_step: StepTiming | None = None  # rank 0: the last step's timing
        self.scheduler: SchedulerInterface | None = None  # during a run, on rank 0
        # A static plan's block pools between runs: cached prefixes stay findable (rank 0)
        self._pools: tuple[PhasePlan, list] | None = None
        self._seqs: dict[int, Sequence] = {}  # added and not finished
        self.weights_version = 0  # moves on at every update: part of cached blocks' keys
        self.routed: RoutedExperts | None = None  # rank 0: enable_return_routed_experts
        if config.enable_return_routed_experts:
            ex = self.executor
            self.routed = RoutedExperts(
                len(self.model_cfg.moe_layers), self.model_cfg.num_experts_per_tok,
                self.cache.block_size, 2 * sum(self.num_blocks.values())
                + (ex.host_slots + ex.disk_slots) // self.cache.block_size)
        self.adapters: Adapters | None = None  # every rank: enable_lora
        if config.lora.enable_lora:
            self.adapters = Adapters(self.model_cfg, config.lora, self.executor.put_lora,
                                     self.executor.control)
        self.executor.worker.on_control = self.lora_control  # (a serving loop replaces it)
        self._t0 = 0.0

    @property
    def plan(self) -> PhasePlan:
        """The plan the ranks run now."""
        return self.executor.plan

    @property
    def layout(self) -> ParallelConfig:
        """The active layout."""
        return self.executor.layout

    @property
    def memory_profile(self):
        """This rank's measured memory profile (GPU ranks; ``None`` when not measured)."""
        return self.executor.memory_profile

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
        host, disk = self.executor.host_slots, self.executor.disk_slots
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
                    self.executor.stop(str(e))
            finally:
                self.stats.add_scheduler(self.scheduler)
                self.scheduler = None
                if isinstance(e, Exception):
                    groups.exit_if_peer_lost(e)
            raise
        self.executor.stop()
        self.stats.add_scheduler(self.scheduler)
        if isinstance(self.scheduler, ReplicaSchedulers):  # no sequence left: no user
            self._pools = (self.plan, [s.pool for s in self.scheduler.replicas])
        self.scheduler = None
        self._end_run()

    def add(self, seq: Sequence) -> None:
        """Queues a sequence (its replica: by its request's index)."""
        seq.replica = seq.request_index % self.plan.prefill.dp
        seq.hash_root = cache_root(self.weights_version, seq.lora_key)
        seq.min_tokens_banned = min_tokens_banned(seq.params, self.eos_token_ids,
                                                  self.model_cfg.vocab_size)
        self._seqs[seq.seq_id] = seq
        self.scheduler.add(seq)

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def use_lora(self, request: LoRARequest) -> Resident:
        """Rank 0, between steps: ``request``'s adapter, loaded on every rank first if it
        is not (``Adapters.use``)."""
        if self.adapters is None:
            raise SeesawError("lora_request needs enable_lora=True")
        return self.adapters.use(request, (s.lora for s in self._seqs.values()))

    def lora_control(self, msg: Control) -> None:
        """Every rank: a LoRA ``Control`` (``Adapters.on_control``)."""
        if self.adapters is None or msg.kind not in LORA_CONTROLS:
            raise SeesawError(f"{msg.kind.value}: this rank runs no serving loop")
        self.adapters.on_control(msg, self.is_driver)

    def sequences(self) -> list[Sequence]:
        """Rank 0: the sequences added and not finished."""
        return list(self._seqs.values())

    @property
    def num_unfinished(self) -> int:
        """Sequences added and not finished."""
        return len(self._seqs)

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
        msg = self.scheduler.schedule()
        if isinstance(msg, Switch):
            self._record(msg, self.executor.switch(msg).seconds)
            return []
        t0 = time.perf_counter()
        outputs = self.executor.run_step(msg)
        self._record(msg, time.perf_counter() - t0)
        return self._update(outputs)

    def use_plan(self, plan: PhasePlan) -> None:
        """Rank 0, between steps of a run: every rank moves to ``plan`` (one the engine
        was built with) through the re-sharding machinery, and a new scheduler takes every
        unfinished sequence. They keep their tokens; those with KV recompute it (not
        counted as preemptions: nothing ran short of memory)."""
        if plan not in self.plans:
            raise SeesawError(f"plan {plan} is not one this engine was built for "
                              f"({', '.join(map(str, self.plans))})")
        self._record(None, self.executor.move(plan).seconds)
        old, self.scheduler = self.scheduler, self._make_scheduler()
        self.stats.add_scheduler(old)
        for seq in sorted(self._seqs.values(), key=lambda s: s.seq_id):
            seq.block_table, seq.status = [], SeqStatus.WAITING
            seq.replica = seq.request_index % plan.prefill.dp
            self.scheduler.add(seq)

    def reset_prefix_cache(self) -> None:
        """Rank 0, between steps or runs: forgets every cached prefix (vLLM's
        ``reset_prefix_cache``; needed when the weights change). Blocks in use stay in use;
        only nothing computed so far is found again."""
        self._pools = None
        if self.scheduler is not None:
            self.scheduler.reset_prefix_cache()
        if self.routed is not None:
            self.routed.clear()

    def update_weights(self, weights: list[tuple[str, Tensor]]) -> int:
        """Every rank, between steps (a serving loop's, or between runs): writes new weights
        into every copy this rank holds (see ``ModelRunner.update_weights``). The weights'
        version moves on, so no block computed before is found by a request added after
        (its hash chain has another root; no flush needed). Sequences in flight keep their
        KV and continue with the new weights. ``weights`` must be checked
        (``weight_update.check_update``)."""
        return self._weights_changed(self.executor.update_weights(weights))

    def load_weights(self, path: str) -> int:
        """Every rank, between steps: every weight from the checkpoint folder ``path`` (HF
        or Megatron) of this same model, taken like ``update_weights``. A folder whose
        architecture differs is a one-line error, nothing written."""
        new = dataclasses.replace(self.config.model, path=path).open()
        for name in SHAPE_FIELDS:
            mine, theirs = getattr(self.model_cfg, name), getattr(new, name)
            if mine != theirs:
                raise SeesawError(f"{path} is not a checkpoint of this model: its {name} is "
                                  f"{theirs}, the engine's is {mine}")
        return self._weights_changed(self.executor.load_weights(open_checkpoint(new)))

    def _weights_changed(self, n: int) -> int:
        self.weights_version += 1
        for seq in self._seqs.values():  # no KV anywhere yet: computed with the new weights
            if seq.status == SeqStatus.WAITING:
                seq.hash_root = cache_root(self.weights_version, seq.lora_key)
                seq.block_hashes = []
        return n

    def sleep(self, level: int = 1) -> None:
        """Every rank, between steps or runs: frees device memory (``Executor.sleep``; see
        ``LLM.sleep``) and the prefix cache, whose KV is gone; sequences on the device wait
        to be recomputed (their tokens kept), those in a tier stay there."""
        if self.scheduler is not None:
            self.scheduler.release_device()
        if self.executor.sleep(level):
            self.reset_prefix_cache()

    @property
    def asleep(self) -> bool:
        """Whether ``sleep`` freed something ``wake_up`` has not restored."""
        return self.executor.asleep

    def abort(self, seq: Sequence) -> None:
        """Rank 0, between steps: ends ``seq`` (``finish_reason`` "abort") wherever it is,
        freeing its blocks and tier slots."""
        if self._seqs.pop(seq.seq_id, None) is not None:
            self.scheduler.abort(seq)
            self.executor.forget(seq.seq_id)
        seq.finish_reason = seq.finish_reason or "abort"

    def wake_up(self, tags: Iterable[str] | None = None) -> None:
        """Every rank: allocates what ``sleep`` freed (``Executor.wake_up``)."""
        self.executor.wake_up(tags)

    def check_ready(self) -> None:
        """Raises unless ``generate`` can run (``Executor.check_ready``)."""
        self.executor.check_ready()

    def finish(self, seq: Sequence) -> None:
        """Ends a sequence (a stop string found by the output processor) and frees its KV."""
        self.scheduler.finish(seq)
        del self._seqs[seq.seq_id]
        self.executor.forget(seq.seq_id)

    def _update(self, outputs: list[RunnerOutput | None]) -> list[Sequence]:
        touched = []
        for out in outputs:
            for tok in out.tokens if out is not None else ():
                seq = self._seqs[tok.seq_id]
                if tok.routed is not None:
                    self.routed.add(seq, tok.routed)
                append_token(seq, tok)
                if token_stop(seq, self.eos_token_ids, self.max_model_len):
                    self.finish(seq)
                touched.append(seq)
        return touched

    def _make_scheduler(self) -> SchedulerInterface:
        pools, self._pools = self._pools, None
        ex = self.executor
        sched = make_scheduler(self.plan, self.sched_cfg, self.cache, self.num_blocks, ex.phase,
                               ex.host_slots, ex.disk_slots, ex.disk_page,
                               pools[1] if pools and pools[0] == self.plan else None)
        if self.routed is not None:  # hits only where their routed experts are kept
            sched.limit_hits(self.routed.known)
        return sched

    def _record(self, msg: Step | Switch | None, seconds: float) -> None:
        """Counts a step, a switch or (``None``) a move to another plan in the stats,
        ``last_step`` and the trace."""
        if isinstance(msg, Step):
            self.stats.add_step(msg, seconds)
            phase = msg.phase
        else:
            self.stats.add_switch(seconds)
            phase = msg.phase if msg is not None else Phase.PREFILL
        switch = not isinstance(msg, Step)
        self.last_step = StepTiming(phase, switch, seconds, msg)
        if self.trace is not None:  # per-step sums only when tracing (O(batch))
            reps = [r for r in msg.replicas if r is not None] if not switch else []
            self.trace.append(TraceEvent(
                time.perf_counter() - self._t0, phase.value, switch,
                sum(len(r.seqs) for r in reps), sum(r.num_tokens for r in reps),
                self.scheduler.tier_usage()))

    # -- the other ranks --------------------------------------------------------------

    def serve(self) -> None:
        """Ranks other than 0: run rank 0's steps until it ends the run."""
        try:
            self.executor.serve()
        except Exception as e:
            groups.exit_if_peer_lost(e)
            raise
        self._end_run()

    def _end_run(self) -> None:
        self.executor.drain()
        if not self.plan.is_static:
            dist.barrier()  # no rank still touches a tier when the next run starts

    def shutdown(self) -> None:
        """Unmaps the tiers and destroys the process groups."""
        self.close()
        groups.shutdown()

    def close(self) -> None:
        """Stops the copy thread and releases the tiers and the device memory (the process
        groups stay up for another engine)."""
        self.executor.close()
