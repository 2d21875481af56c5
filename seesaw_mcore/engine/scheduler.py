"""Continuous batching for one DP replica: all-prefill or all-decode steps.

Prefill packs waiting sequences up to ``max_prefill_tokens`` / ``max_num_seqs`` while device
blocks allow; otherwise every running sequence decodes one token. When blocks run out in
decode, the newest running sequence is preempted: its blocks are freed and it is recomputed
(prefill over prompt + generated tokens) later. Holds no tensors.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from seesaw_mcore.contract import (
    Phase,
    SamplingSpec,
    ScheduledSeq,
    SchedulerOutput,
    StepPlan,
)
from seesaw_mcore.engine.request import SeqStatus, Sequence
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.kv.block_pool import BlockPool

POLICIES = ("transition_minimizing", "prefill_first", "decode_first")


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching budgets.

    Attributes:
        max_num_seqs: most sequences in one step.
        max_prefill_tokens: most prompt tokens in one prefill step (a longer single prompt
            still runs, alone).
        prefill_micro_batches: micro-batches per pipeline stage in a prefill step (PP > 1).
            More shrink the pipeline bubble (efficiency m / (m + PP - 1) for m micro-batches);
            decode always uses PP micro-batches, so each stage reads its weights PP times.
        policy: when a re-sharding plan switches decode -> prefill (prefill -> decode is
            always: when no tier can take the next prompt, or nothing waits).
            ``transition_minimizing`` (the paper's): once the KV tiers have drained below
            ``refill_threshold`` and prompts wait. ``prefill_first``: as soon as a waiting
            prompt fits the tiers (many switches, small decode batches). ``decode_first``:
            only once nothing is left to decode.
        refill_threshold: with ``transition_minimizing``, the fraction of the tiers' token
            slots still holding KV under which decode hands back to prefill. Sequences still
            decoding then have their KV swapped out to a tier, to resume after the prefill
            phase.
    """

    max_num_seqs: int = 256
    max_prefill_tokens: int = 4096
    prefill_micro_batches: int = 4
    policy: str = "transition_minimizing"
    refill_threshold: float = 0.2

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise SeesawError(f"scheduler.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_prefill_tokens < 1:
            raise SeesawError(
                f"scheduler.max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.prefill_micro_batches < 1:
            raise SeesawError(f"scheduler.prefill_micro_batches must be >= 1, got "
                              f"{self.prefill_micro_batches}")
        if self.policy not in POLICIES:
            raise SeesawError(f"scheduler.policy must be one of {', '.join(POLICIES)}, got "
                              f"{self.policy!r}")
        if not 0 <= self.refill_threshold <= 1:
            raise SeesawError(f"scheduler.refill_threshold must be in [0, 1], got "
                              f"{self.refill_threshold}")


class Scheduler:
    """Queues and block tables of one replica.

    Args:
        config: batching budgets.
        pool: the replica's device block pool.
        pp: pipeline stages (micro-batches per step).
    """

    def __init__(self, config: SchedulerConfig, pool: BlockPool, pp: int) -> None:
        self.config, self.pool, self.pp = config, pool, pp
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput | None:
        """Picks the next step, or ``None`` when there is nothing to run."""
        batch = self._schedule_prefill()
        if batch:
            return SchedulerOutput(Phase.PREFILL, self._split(batch, by_tokens=True))
        batch = self._schedule_decode()
        if batch:
            return SchedulerOutput(Phase.DECODE, self._split(batch, by_tokens=False))
        return None

    def _schedule_prefill(self) -> list[ScheduledSeq]:
        batch: list[ScheduledSeq] = []
        tokens = 0
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            n = seq.num_tokens
            if batch and tokens + n > self.config.max_prefill_tokens:
                break
            if not self.pool.can_allocate(seq.block_table, n):
                break
            self.waiting.popleft()
            self.pool.allocate(seq.block_table, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.append(scheduled(seq, seq.all_token_ids, 0))
            tokens += n
        return batch

    def _schedule_decode(self) -> list[ScheduledSeq]:
        grow_running(self.pool, self.running, self._preempt)
        return [scheduled(s, s.output_token_ids[-1:], s.num_tokens - 1) for s in self.running]

    def _preempt(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table)
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Removes a finished sequence and frees its blocks."""
        seq.status = SeqStatus.FINISHED
        self.pool.free(seq.block_table)
        self.running.remove(seq)

    def _split(self, batch: list[ScheduledSeq], by_tokens: bool) -> list[list[ScheduledSeq]]:
        parts = prefill_parts(self.config, self.pp) if by_tokens else self.pp
        return split_micro_batches(batch, parts, by_tokens)


class ReplicaSchedulers:
    """A static plan's schedulers, one per DP replica; a sequence stays on its replica.

    Args:
        config: batching budgets.
        dp: DP replicas.
        pp: pipeline stages.
        num_blocks: device blocks per rank.
        block_size: tokens per block.
    """

    def __init__(self, config: SchedulerConfig, dp: int, pp: int, num_blocks: int,
                 block_size: int) -> None:
        self.replicas = [Scheduler(config, BlockPool(num_blocks, block_size), pp)
                         for _ in range(dp)]

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.replicas)

    num_swap_preemptions = 0  # static plans have no host tier: preemption recomputes

    def add(self, seq: Sequence) -> None:
        self.replicas[seq.replica].add(seq)

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for prefill (new or preempted), over all replicas."""
        return sum(len(s.waiting) for s in self.replicas)

    def has_work(self) -> bool:
        return any(s.has_work() for s in self.replicas)

    def schedule(self) -> StepPlan:
        """Every replica's next step."""
        plans = [s.schedule() for s in self.replicas]
        if not any(plans):
            raise RuntimeError("scheduler stalled with work left (a bug)")
        return StepPlan(plans)

    def finish(self, seq: Sequence) -> None:
        self.replicas[seq.replica].finish(seq)


def grow_running(pool: BlockPool, running: list[Sequence],
                 preempt: Callable[[Sequence], None]) -> None:
    """Gives every running sequence the blocks for one more token; when they run out, the
    newest running sequence (maybe the one being grown) is removed and passed to
    ``preempt``, which must free its blocks."""
    i = 0
    while i < len(running):
        seq = running[i]
        if pool.can_allocate(seq.block_table, seq.num_tokens):
            pool.allocate(seq.block_table, seq.num_tokens)
            i += 1
        else:
            preempt(running.pop())


def prefill_parts(config: SchedulerConfig, pp: int) -> int:
    """Micro-batches of a prefill step: ``prefill_micro_batches`` per stage under PP."""
    return pp * config.prefill_micro_batches if pp > 1 else 1


def split_micro_batches(batch: list[ScheduledSeq], parts: int,
                        by_tokens: bool) -> list[list[ScheduledSeq]]:
    """Splits a step into at most ``parts`` micro-batches of balanced size (tokens in
    prefill, sequences in decode)."""
    parts = min(parts, len(batch))
    if parts <= 1:
        return [batch]
    weights = [len(s.token_ids) if by_tokens else 1 for s in batch]
    target = sum(weights) / parts
    out: list[list[ScheduledSeq]] = [[]]
    acc = 0.0
    for s, w in zip(batch, weights):
        if out[-1] and acc >= target * len(out) and len(out) < parts:
            out.append([])
        out[-1].append(s)
        acc += w
    return out


def scheduled(seq: Sequence, token_ids: list[int], start: int,
              block_table: list[int] | None = None) -> ScheduledSeq:
    """The step entry of ``seq``: feed ``token_ids`` at ``start`` (its own block table by
    default)."""
    p = seq.params
    spec = SamplingSpec(
        temperature=float(p.temperature), top_k=int(p.top_k), top_p=float(p.top_p),
        seed=seq.seed, step=len(seq.output_token_ids), logprobs=p.logprobs,
        min_p=float(p.min_p),
    )
    table = seq.block_table if block_table is None else block_table
    return ScheduledSeq(seq.seq_id, list(token_ids), start, list(table), spec)
