"""This rank's runtime, built from the engine's configuration and driven through a small
interface (vLLM's executor): the engine never reaches into the runner, the copier, the copy
thread or the step channel.

What it builds, in order: the weight shards of every layout the engine may run
(``ShardStore``), the stage and the paged KV cache (``ModelRunner``; on CPU ranks every
layout's stage up front when there are several plans, since they view the shards), the KV
budget (``kv_budget.kv_blocks``, a profiling run on GPUs), the KV tiers of a re-sharding
plan, and the ``Worker`` that runs step messages.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from seesaw_mcore import env
from seesaw_mcore.config import EngineConfig, ModelConfig, ParallelConfig, PhasePlan
from seesaw_mcore.contract import Control, MovePlan, Phase, RunnerOutput, Step, Switch
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.kv.tiers import open_disk_tier, open_host_tier
from seesaw_mcore.kv.transfer import TransferStats
from seesaw_mcore.model.loader import open_checkpoint
from seesaw_mcore.runtime import groups
from seesaw_mcore.runtime.cuda_graphs import capture_sizes
from seesaw_mcore.runtime.kv_budget import MemoryProfile, kv_blocks
from seesaw_mcore.runtime.model_runner import ModelRunner
from seesaw_mcore.runtime.reshard import SwitchRecord
from seesaw_mcore.runtime.weights import ShardStore
from seesaw_mcore.runtime.worker import Worker

if TYPE_CHECKING:
    import torch

SLEEP_TAGS = ("weights", "kv_cache")  # what wake_up(tags=...) may name (vLLM's)


class Executor:
    """This rank's shards, stage, KV cache, tiers and worker.

    Args:
        config: the engine's configuration.
        model_cfg: the opened model.
        plans: the plan to start on first, then every other plan it may move to.
        rank: this rank.
        dtype: parameter and KV dtype.
        max_model_len: the longest sequence.
    """

    def __init__(self, config: EngineConfig, model_cfg: ModelConfig, plans: list[PhasePlan],
                 rank: int, dtype: torch.dtype, max_model_len: int) -> None:
        cache, sched = config.cache, config.scheduler
        layouts = list(dict.fromkeys(lay for p in plans for lay in (p.prefill, p.decode)))
        store = ShardStore(open_checkpoint(model_cfg), layouts, rank, dtype)
        # (MoE layers group tokens by expert with host-side counts: not capturable yet)
        graphs = (not config.runtime.enforce_eager and not model_cfg.num_experts
                  and (groups.device().type == "cuda" or env.decode_padding()))
        self.runner = runner = ModelRunner(
            model_cfg, plans[0], dtype, cache.block_size, store, cache.async_swap, layouts,
            capture_sizes(sched.max_num_seqs) if graphs else None, max_model_len,
            config.run_options())
        if len(plans) > 1 and runner.device.type == "cpu":
            for lay in layouts:  # CPU stages view the store: build them all now, not mid-run
                runner.use(lay)
            runner.use(plans[0].prefill)
        self.num_blocks: dict[ParallelConfig, int]
        self.memory_profile: MemoryProfile | None  # measured on GPU ranks (else None)
        self.num_blocks, self.memory_profile = kv_blocks(  # after the weights
            runner, cache, max(sched.max_prefill_tokens, max_model_len), sched.max_num_seqs,
            max_model_len)
        runner.allocate_kv(self.num_blocks)
        copier = runner.copier
        if not all(p.is_static for p in plans):
            copier.host = open_host_tier(model_cfg, cache, dtype)
        if cache.disk_path:
            copier.disk = open_disk_tier(model_cfg, cache, dtype)
        self.worker = Worker(runner, plans[0])
        self._asleep: set[str] = set()  # what sleep() freed and wake_up() has not restored
        self._sleep_blocks: dict[ParallelConfig, int] = {}

    # -- facts ------------------------------------------------------------------------

    @property
    def plan(self) -> PhasePlan:
        """The plan the ranks run now."""
        return self.worker.plan

    @property
    def phase(self) -> Phase:
        """The phase the live plan's layout serves now."""
        return self.worker.phase

    @property
    def layout(self) -> ParallelConfig:
        return self.worker.layout

    @property
    def host_slots(self) -> int:
        """Token slots of the host KV tier (0: none)."""
        host = self.runner.copier.host
        return host.shape[3] if host is not None else 0

    @property
    def disk_slots(self) -> int:
        """Token slots of the disk KV tier (0: none)."""
        disk = self.runner.copier.disk
        return disk.num_slots if disk is not None else 0

    @property
    def disk_page(self) -> int:
        """Tokens per disk page (a disk record's alignment; 1 without a disk tier)."""
        disk = self.runner.copier.disk
        return disk.page if disk is not None else 1

    @property
    def tier_traffic(self) -> TransferStats:
        """This rank's tier copies so far."""
        return self.runner.transfer.stats

    # -- rank 0, during a run ---------------------------------------------------------

    def run_step(self, step: Step) -> list[RunnerOutput | None]:
        """Broadcasts ``step``, runs this rank's part, returns every replica's tokens."""
        self.worker.channel.send(step)
        return self.worker.collect(step, self.worker.run_step(step))

    def switch(self, msg: Switch) -> SwitchRecord:
        """Broadcasts ``msg``; every rank re-shards."""
        self.worker.channel.send(msg)
        return self.worker.switch(msg)

    def move(self, plan: PhasePlan) -> SwitchRecord:
        """Broadcasts a move to ``plan``; every rank re-shards to its prefill layout."""
        msg = MovePlan(plan.to_string())
        self.worker.channel.send(msg)
        return self.worker.move(msg)

    def stop(self, error: str | None = None) -> None:
        """Ends the workers' ``serve`` (with ``error``: they raise it)."""
        self.worker.stop(error)

    def forget(self, seq_id: int) -> None:
        """A sequence ended: every rank drops what it keeps of it (with the next step)."""
        self.worker.channel.mirror.forget(seq_id)

    def control(self, msg: Control) -> None:
        """Broadcasts a serving loop's command; every rank runs it (this one too)."""
        self.worker.channel.send(msg)
        self.worker.control(msg)

    # -- the other ranks --------------------------------------------------------------

    def serve(self) -> None:
        """Runs rank 0's messages until it stops the run."""
        self.worker.serve()

    # -- every rank, between runs -----------------------------------------------------

    def drain(self) -> None:
        """Waits for this rank's tier copies."""
        self.runner.drain()

    def put_lora(self, index: int, adapter) -> None:
        """Loads a LoRA adapter (``model.lora.LoRAAdapter``) at ``index`` on this rank
        (``None``: unloads it)."""
        self.runner.adapters.put(index, adapter)

    def update_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """See ``ModelRunner.update_weights`` (not while the weights sleep)."""
        self._check_awake("update_weights")
        return self.runner.update_weights(weights)

    def load_weights(self, ckpt) -> int:
        """See ``ModelRunner.load_weights`` (not while the weights sleep)."""
        self._check_awake("update_weights_from_disk")
        return self.runner.load_weights(ckpt)

    def _check_awake(self, what: str) -> None:
        if "weights" in self._asleep:
            raise SeesawError(f"{what} while asleep: call wake_up() (or "
                              "wake_up(tags=['weights'])) first")

    def sleep(self, level: int) -> bool:
        """Frees the device KV cache and the device stages (level 1; the host shards stay)
        or also the host shards (level 2: ``ShardStore.discard``, whose values an update
        must then bring), vLLM's sleep mode. Returns whether it freed anything (asleep
        already: nothing)."""
        if level not in (1, 2):
            raise SeesawError(f"sleep: level must be 1 or 2, got {level!r}")
        if self._asleep:
            return False
        runner = self.runner
        runner.drain()
        self._sleep_blocks = dict(runner.kv.num_blocks)  # for the wake-up
        runner.release()
        if level == 2:
            runner.store.discard()
        self._asleep = set(SLEEP_TAGS)
        return True

    def wake_up(self, tags: Iterable[str] | None = None) -> None:
        """Allocates what ``sleep`` freed (``tags``: ``"weights"`` and/or ``"kv_cache"``;
        default both)."""
        tags = set(SLEEP_TAGS if tags is None else tags)
        unknown = sorted(tags - set(SLEEP_TAGS))
        if unknown:
            raise SeesawError(f"wake_up: unknown tags {unknown}; known: {list(SLEEP_TAGS)}")
        if "weights" in tags & self._asleep:
            # the live stage from the host shards (allocated again, zero, after a level-2
            # sleep); other layouts' stages are rebuilt when next used
            store = self.runner.store
            if store.discarded:
                store.restore()
            self.runner.use(self.runner.info.layout)
        if "kv_cache" in tags & self._asleep:
            self.runner.allocate_kv(self._sleep_blocks)
        self._asleep -= tags

    @property
    def asleep(self) -> bool:
        """Whether ``sleep`` freed something ``wake_up`` has not restored."""
        return bool(self._asleep)

    def check_ready(self) -> None:
        """Raises unless a run can start: awake, and after a level-2 sleep, every weight
        written again."""
        if self._asleep:
            raise SeesawError(f"the engine is asleep ({', '.join(sorted(self._asleep))} "
                              "freed by sleep()); call wake_up() first")
        missing = self.runner.store.missing
        if missing:
            raise SeesawError(f"the weights were discarded by sleep(level=2): "
                              f"{len(missing)} shard tensors have no values yet; call "
                              "update_weights with every parameter before generate")

    def close(self) -> None:
        """Stops the copy thread, unmaps the tiers and frees the device KV cache and stages
        (the process groups stay up for another engine)."""
        copier = self.runner.copier
        try:
            self.runner.transfer.close()
        finally:
            for tier in (copier.host, copier.disk):
                if tier is not None:
                    tier.close()
            copier.host = copier.disk = None
            self.runner.release()  # the device KV cache and weights, back to the driver
