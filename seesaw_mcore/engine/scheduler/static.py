"""Continuous batching for a static plan, one scheduler per DP replica: all-prefill or
all-decode steps.

Prefill packs waiting sequences up to ``max_prefill_tokens`` / ``max_num_seqs`` (counting
only the tokens a step computes: with prefix caching, cached blocks are shared, not
recomputed) while device blocks allow; otherwise every running sequence decodes one token.
When blocks run out in decode, the newest running sequence is preempted: its blocks are
freed (cached full blocks keep their KV until needed) and it is recomputed (prefill over
prompt + generated tokens, from its longest cached prefix) later. Holds no tensors.
"""

from __future__ import annotations

from collections import deque

from seesaw_mcore.config import SchedulerConfig
from seesaw_mcore.contract import Phase, ScheduledSeq, SchedulerOutput, Step
from seesaw_mcore.engine.request import SeqStatus, Sequence
from seesaw_mcore.engine.scheduler.batching import (
    PrefillPack,
    PrefixStats,
    grow_running,
    prefix_hit,
    scheduled,
    split_micro_batches,
    take_blocks,
)
from seesaw_mcore.kv.block_pool import BlockPool, pools_usage


class ReplicaScheduler:
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
        self.prefix = PrefixStats()

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput | None:
        """Picks the next step, or ``None`` when there is nothing to run."""
        prefill = self._schedule_prefill()
        if prefill is not None:
            return prefill
        batch = self._schedule_decode()
        if batch:
            return SchedulerOutput(Phase.DECODE, split_micro_batches(batch, self.pp, False))
        return None

    def _schedule_prefill(self) -> SchedulerOutput | None:
        pack = PrefillPack(self.config, running=len(self.running))
        while self.waiting:
            seq = self.waiting[0]
            n = seq.num_tokens
            hit = prefix_hit(self.pool, seq)
            start = len(hit) * self.pool.block_size
            if not pack.fits(n - start) or not self.pool.can_allocate(seq.block_table, n, hit):
                break
            self.waiting.popleft()
            take_blocks(self.pool, seq, seq.block_table, hit)
            self.prefix.add(n, start)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            pack.add(scheduled(seq, seq.all_token_ids[start:], start))
        return pack.output(self.pp)

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

    def abort(self, seq: Sequence) -> None:
        """Removes ``seq`` waiting or running; its blocks are freed."""
        if seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
            seq.status = SeqStatus.FINISHED
        elif seq.status == SeqStatus.RUNNING:
            self.finish(seq)

    def release_device(self) -> None:
        """Every running sequence waits for prefill again (recompute), in order."""
        for seq in reversed(self.running):
            self._preempt(seq)
        self.running.clear()


class ReplicaSchedulers:
    """A static plan's schedulers, one per DP replica; a sequence stays on its replica.

    Args:
        config: batching budgets.
        dp: DP replicas.
        pp: pipeline stages.
        num_blocks: device blocks per rank.
        block_size: tokens per block.
        enable_caching: prefix caching in the replicas' pools.
        pools: the replicas' pools of an earlier run of the same plan (their cached
            prefixes stay findable), instead of new ones.
    """

    def __init__(self, config: SchedulerConfig, dp: int, pp: int, num_blocks: int,
                 block_size: int, enable_caching: bool = False,
                 pools: list[BlockPool] | None = None) -> None:
        self.config = config
        pools = pools or [BlockPool(num_blocks, block_size, enable_caching) for _ in range(dp)]
        self.replicas = [ReplicaScheduler(config, pool, pp) for pool in pools]
        self._last: tuple[int, int] | None = None  # (request index, replica) of the last add
        # per replica: full-block hashes of the prompts routed there and not yet prefilled
        # (a prompt routed behind them finds its prefix there before it is computed)
        self._pending: list[dict[bytes, int]] = [{} for _ in self.replicas]
        self._pending_of: dict[int, list[bytes]] = {}  # seq id -> its hashes in _pending

    @property
    def num_preemptions(self) -> int:
        return sum(s.num_preemptions for s in self.replicas)

    @property
    def prefix(self) -> PrefixStats:
        """Prefix-cache counters over all replicas."""
        out = PrefixStats()
        for s in self.replicas:
            out.add(s.prefix.queried, s.prefix.hit)
        return out

    num_swap_preemptions = 0  # static plans have no host tier: preemption recomputes
    num_handed_back = 0  # and never hand sequences back to a tier

    def tier_usage(self) -> float | None:
        """No KV tiers in a static plan."""
        return None

    def kv_usage(self) -> float:
        return pools_usage([s.pool for s in self.replicas])

    @property
    def tier_shared_tokens(self) -> int:
        """No KV tiers in a static plan."""
        return 0

    def add(self, seq: Sequence) -> None:
        """Queues ``seq`` on a replica: with prefix caching, the one whose cache holds the
        longest part of its prompt unless that one is busier than the least loaded by more
        than half a batch (else the least loaded); a request's samples stay together.
        Without caching, ``seq.replica`` as the engine set it."""
        if len(self.replicas) > 1 and self.replicas[0].pool.enable_caching:
            if self._last is not None and self._last[0] == seq.request_index:
                seq.replica = self._last[1]
            else:
                seq.replica = self._route(seq)
            self._last = (seq.request_index, seq.replica)
            pending = self._pending[seq.replica]
            for h in seq.block_hashes:
                pending[h] = pending.get(h, 0) + 1
            self._pending_of[seq.seq_id] = list(seq.block_hashes)
        self.replicas[seq.replica].add(seq)

    def _route(self, seq: Sequence) -> int:
        loads = [len(s.waiting) + len(s.running) for s in self.replicas]
        least = min(range(len(loads)), key=loads.__getitem__)
        hits = [max(len(prefix_hit(s.pool, seq)), self._pending_hit(r, seq))
                for r, s in enumerate(self.replicas)]
        best = max(range(len(loads)), key=lambda r: (hits[r], -loads[r]))
        if hits[best] > hits[least] and loads[best] <= loads[least] + self.config.max_num_seqs // 2:
            return best
        return least

    def _pending_hit(self, r: int, seq: Sequence) -> int:
        """Leading full blocks of ``seq`` that prompts already routed to replica ``r`` will
        compute (``seq.block_hashes`` is filled by ``prefix_hit``)."""
        n, pending = 0, self._pending[r]
        limit = (seq.num_tokens - 1) // self.replicas[r].pool.block_size
        while n < min(limit, len(seq.block_hashes)) and seq.block_hashes[n] in pending:
            n += 1
        return n

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for prefill (new or preempted), over all replicas."""
        return sum(len(s.waiting) for s in self.replicas)

    def has_work(self) -> bool:
        return any(s.has_work() for s in self.replicas)

    def schedule(self) -> Step:
        """Every replica's next step."""
        outs = [s.schedule() for s in self.replicas]
        if not any(outs):
            raise RuntimeError("scheduler stalled with work left (a bug)")
        for r, out in enumerate(outs):  # prefilled: cached from now on, no longer pending
            for entry in out.seqs if out is not None and out.phase == Phase.PREFILL else ():
                self._unpend(r, entry.seq_id)
        return Step(outs)

    def _unpend(self, r: int, seq_id: int) -> None:
        """A prompt routed to replica ``r`` no longer counts as pending there."""
        pending = self._pending[r]
        for h in self._pending_of.pop(seq_id, ()):
            if pending[h] > 1:
                pending[h] -= 1
            else:
                del pending[h]

    def finish(self, seq: Sequence) -> None:
        self.replicas[seq.replica].finish(seq)

    def abort(self, seq: Sequence) -> None:
        """Removes ``seq`` from its replica (and its prompt's pending hashes)."""
        self.replicas[seq.replica].abort(seq)
        self._unpend(seq.replica, seq.seq_id)

    def release_device(self) -> None:
        for s in self.replicas:
            s.release_device()

    def reset_prefix_cache(self) -> None:
        for s in self.replicas:
            s.pool.reset_cache()

    def limit_hits(self, accept) -> None:  # noqa: D102
        for s in self.replicas:
            s.pool.hit_filter = accept
