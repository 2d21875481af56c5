"""Seesaw scheduling for a plan whose prefill and decode layouts differ (``P2 -> T2``).

Prefill runs under the prefill layout: each step packs waiting prompts, the device cache is
only scratch for that step, and every prefilled sequence's KV goes to the node's host tier.
When the host tier is full, prefill goes on into the disk tier if one is configured.
Decode runs under the decode layout: tier sequences are admitted into device blocks (swap-in,
prefetched while the step before their first one runs) and decoded with continuous batching;
when blocks run out, the newest sequence's KV is swapped back out to a tier (recomputed
instead when no tier has room). When decode hands back to prefill is the policy's choice
(``scheduler.policy``, see ``SchedulerConfig``): ``transition_minimizing`` (the paper's,
the default) once the tiers' load is below ``refill_threshold``, ``prefill_first`` as soon
as a waiting prompt fits, ``decode_first`` only when nothing is left to decode. Holds no
tensors; one instance drives every DP replica of both layouts (their DP degrees may differ:
the host tier is shared by the node, so any replica can decode any sequence).

Prefix caching (``enable_caching``): each layout's device pool caches full blocks for the
length of a phase (a switch hands the device memory to the other layout, so that pool's
cache is reset there). A prefill computes only what the prefill pool does not hold; its KV
goes to the host tier once per prefix (``kv.tier_kv``: a prefix the tier holds is
referenced and only the rest is written), and an admission into decode brings a shared
prefix into the decode pool once for all its users. Across switches shared KV lives in the
host tier, for as long as a sequence that uses it waits there; a prefill phase's device
cache starts empty.
"""

from __future__ import annotations

import time
from collections import deque

from seesaw_mcore.config import PhasePlan, SchedulerConfig
from seesaw_mcore.contract import DISK, HOST, KVMove, Phase, SchedulerOutput, Step, Switch
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
from seesaw_mcore.engine.scheduler.tier_book import TierBook
from seesaw_mcore.kv import tier_kv
from seesaw_mcore.kv.block_pool import BlockPool, pools_usage
from seesaw_mcore.kv.slots import SlotAllocator


class PhaseScheduler:
    """Queues, device block pools of both layouts, and the tiers' book (``TierBook``).

    Args:
        config: batching budgets.
        plan: the prefill and decode layouts.
        prefill_blocks: device blocks per rank under the prefill layout.
        decode_blocks: device blocks per rank under the decode layout.
        block_size: tokens per block.
        host_slots: token slots of the host KV tier.
        phase: the phase the ranks are in now.
        watermark_blocks: free decode blocks an admission from a tier must leave.
        disk_slots: token slots of the disk tier (0: none).
        disk_align: the disk tier's slot granularity (its page, in tokens).
        enable_caching: prefix caching in the device pools and sharing in the host tier.
    """

    def __init__(self, config: SchedulerConfig, plan: PhasePlan, prefill_blocks: int,
                 decode_blocks: int, block_size: int, host_slots: int,
                 phase: Phase = Phase.PREFILL, watermark_blocks: int = 0,
                 disk_slots: int = 0, disk_align: int = 1, enable_caching: bool = False) -> None:
        self.config, self.plan, self.phase = config, plan, phase
        self.watermark_blocks, self.block_size = watermark_blocks, block_size
        self.prefill_pools = [BlockPool(prefill_blocks, block_size, enable_caching)
                              for _ in range(plan.prefill.dp)]
        self.decode_pools = [BlockPool(decode_blocks, block_size, enable_caching)
                             for _ in range(plan.decode.dp)]
        self.book = TierBook(host_slots, disk_slots, disk_align, block_size, enable_caching)
        self.prefix = PrefixStats()
        self.waiting: deque[Sequence] = deque()  # need prefill (new or preempted)
        self.offloaded: deque[Sequence] = deque()  # KV in a tier, in prefill order
        self.running: list[list[Sequence]] = [[] for _ in range(plan.decode.dp)]
        # admitted last step, KV prefetched during it: they join ``running`` this step
        self.arriving: list[list[Sequence]] = [[] for _ in range(plan.decode.dp)]
        self._preempted: list[Sequence] = []  # swapped out this step: admissible from the next
        self.num_switches = 0
        self.num_preemptions = 0  # recompute and swap
        self.num_swap_preemptions = 0
        self.num_handed_back = 0  # sequences swapped out mid-decode for a prefill phase

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for prefill (new or preempted)."""
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.offloaded or self._preempted or any(self.running)
                    or any(self.arriving))

    @property
    def tiers(self) -> dict[str, SlotAllocator]:
        """The tiers' slot allocators, host first."""
        return self.book.tiers

    @property
    def host(self) -> SlotAllocator:
        return self.book.tiers[HOST]

    def schedule(self) -> Step | Switch:
        """The next step for every replica, or a switch to the other phase."""
        if self.phase == Phase.PREFILL:
            replicas = self._schedule_prefill()
            if any(replicas):
                return Step(replicas)
            if self.offloaded or self._preempted or any(self.running) or self.book.dead:
                return self._switch(Phase.DECODE)
        else:
            if self._refill_due():
                return self._switch(Phase.PREFILL)
            replicas = self._schedule_decode()
            if any(replicas):
                return Step(replicas)
            if self.waiting:
                return self._switch(Phase.PREFILL)
        raise RuntimeError("scheduler stalled with work left (a bug)")

    def _switch(self, phase: Phase) -> Switch:
        """Past the switch's barrier no rank touches dead slots, and every swap-out is
        written: dead slots are freed, swapped-out sequences are first in line. Sequences
        still on the device (a hand-back to prefill) are swapped out to the tiers right
        after the barrier, under the decode layout (the switch's ``hand_back``)."""
        self.phase = phase
        self.num_switches += 1
        for pool in self.prefill_pools + self.decode_pools:  # the other layout's memory now
            pool.reset_cache()
        self.book.free_dead()
        hand_back = self._hand_back() if self._on_device() else []
        self.offloaded.extendleft(reversed(self._preempted))
        self._preempted = []
        return Switch(phase, hand_back)

    @property
    def tier_shared_tokens(self) -> int:
        """KV tokens stored in a tier by reference (a shared prefix), not written."""
        return self.book.tier_kv.shared_tokens

    def tier_usage(self) -> float:
        """The tiers' load (``TierBook.usage``) with what decodes on the device counted
        there. Falls only as sequences finish."""
        return self.book.usage(sum(s.num_tokens for s in self._on_device()))

    def kv_usage(self) -> float:
        return pools_usage(self.prefill_pools if self.phase == Phase.PREFILL
                           else self.decode_pools)

    def _on_device(self) -> list[Sequence]:
        return [s for r in range(len(self.running)) for s in self.running[r] + self.arriving[r]]

    def _refill_due(self) -> bool:
        """Whether decode hands back to prefill now, per the policy: only if the sequences
        on the device can all be swapped out to the tiers and the next prompt then fits
        (so the prefill phase makes progress)."""
        policy, wait = self.config.policy, self.config.max_wait_s
        if not self.waiting or policy == "decode_first":
            return False  # decode_first: the phase ends when nothing is left to decode
        overdue = wait is not None and time.monotonic() - self.waiting[0].arrival > wait
        if (policy == "transition_minimizing" and not overdue
                and self.tier_usage() >= self.config.refill_threshold):
            return False
        return self.book.can_hand_back(self._on_device(), self.waiting[0].num_tokens)

    def _hand_back(self) -> list[SchedulerOutput | None]:
        """Swaps every running and arriving sequence out to a tier (``_refill_due`` checked
        that they fit)."""
        out: list[SchedulerOutput | None] = []
        for r in range(len(self.running)):
            moves = []
            for seq in self.running[r] + self.arriving[r]:
                moves += self.book.store(seq, seq.block_table, seq.num_tokens - 1)
                self.decode_pools[r].free(seq.block_table)
                self._preempted.append(seq)
                self.num_handed_back += 1
            self.running[r], self.arriving[r] = [], []
            out.append(SchedulerOutput(Phase.DECODE, [], preempt=moves) if moves else None)
        return out

    def _schedule_prefill(self) -> list[SchedulerOutput | None]:
        """Packs waiting prompts, while a tier, the budgets and the replica's scratch blocks
        allow, into the replica whose cache holds most of the prompt, else the one with the
        fewest tokens so far."""
        dp = self.plan.prefill.dp
        packs = [PrefillPack(self.config) for _ in range(dp)]
        while self.waiting:
            seq = self.waiting[0]
            n = seq.num_tokens
            if not self.book.fits(seq, n):
                break
            hits = [prefix_hit(pool, seq) for pool in self.prefill_pools]
            bs = self.block_size
            r = next((r for r in sorted(range(dp), key=lambda r: (-len(hits[r]), packs[r].tokens))
                      if packs[r].fits(n - len(hits[r]) * bs)
                      and self.prefill_pools[r].can_allocate([], n, hits[r])), None)
            if r is None:
                break
            self.waiting.popleft()
            table: list[int] = []
            take_blocks(self.prefill_pools[r], seq, table, hits[r])
            start = len(hits[r]) * bs
            self.prefix.add(n, start)
            moves = self.book.store(seq, table, n)
            seq.replica = r
            self.offloaded.append(seq)
            packs[r].add(scheduled(seq, seq.all_token_ids[start:], start, table),
                         moves[0] if moves else None)
        for r, pack in enumerate(packs):  # scratch: the KV leaves for a tier in the step
            for entry in pack.seqs:  # (cached blocks stay findable until this phase ends)
                self.prefill_pools[r].free(list(entry.block_table))
        return [pack.output(self.plan.prefill.pp) for pack in packs]

    def _schedule_decode(self) -> list[SchedulerOutput | None]:
        """Last step's admissions join the batch; grows every running sequence by one token
        (preempting the newest on shortage), then admits tier sequences where blocks remain
        (not into a replica that just preempted, and not a sequence preempted in this very
        step: its KV is written during the step). Admitted sequences' KV is prefetched
        during this step (what the decode pool already caches is shared instead); they
        decode from the next."""
        for r, arrived in enumerate(self.arriving):
            self.running[r] += arrived
            arrived.clear()
        for seq in reversed(self._preempted):
            self.offloaded.appendleft(seq)  # written by now: first in line to come back
        self._preempted = []
        preempted: list[list[KVMove]] = [[] for _ in self.running]
        admitted: list[list[KVMove]] = [[] for _ in self.running]
        for r, running in enumerate(self.running):
            grow_running(self.decode_pools[r], running,
                         lambda victim, out=preempted[r]: self._preempt(victim, out))
        while self.offloaded:
            seq = self.offloaded[0]
            kv_len = seq.num_tokens - 1
            # cached blocks may replace a host piece's start, never a disk record's (whole
            # O_DIRECT pages are read)
            pieces = self.book.pieces(seq)
            disk = next((p.pos for p in pieces if p.span.slots.tier == DISK), kv_len)
            full = self.book.hashes(seq)[:min(kv_len, disk) // self.block_size]
            hits = [pool.match(full) for pool in self.decode_pools]
            r = self._replica_for(seq, [bool(e) for e in preempted], hits)
            if r is None:
                break
            self.offloaded.popleft()
            if not self.decode_pools[r].allocate_slots(seq.block_table, seq.num_tokens,
                                                       hits[r], full):
                raise RuntimeError(f"no KV blocks for sequence {seq.seq_id} (a bug)")
            admitted[r] += tier_kv.moves(seq.seq_id, pieces, seq.block_table, self.block_size,
                                         len(hits[r]) * self.block_size)
            self.book.release(seq)
            seq.status, seq.replica = SeqStatus.RUNNING, r
            self.arriving[r].append(seq)
        out: list[SchedulerOutput | None] = []
        for r, running in enumerate(self.running):
            batch = [scheduled(s, s.output_token_ids[-1:], s.num_tokens - 1) for s in running]
            busy = batch or preempted[r] or admitted[r] or self.arriving[r]  # (no copy)
            mbs = split_micro_batches(batch, self.plan.decode.pp, False) if batch else []
            out.append(SchedulerOutput(Phase.DECODE, mbs, preempt=preempted[r],
                                       swap_in=admitted[r]) if busy else None)
        return out

    def _preempt(self, victim: Sequence, preempted: list[KVMove]) -> None:
        """Swaps the victim's KV out to a tier with room (it comes back in this decode
        phase), else frees it for recompute in the next prefill phase."""
        pool = self.decode_pools[victim.replica]
        victim.num_preemptions += 1
        self.num_preemptions += 1
        kv_len = victim.num_tokens - 1  # all but the last token's KV
        if self.book.fits(victim, kv_len):
            preempted += self.book.store(victim, victim.block_table, kv_len)
            self._preempted.append(victim)
            self.num_swap_preemptions += 1
        else:
            victim.status = SeqStatus.WAITING
            self.waiting.appendleft(victim)
        pool.free(victim.block_table)

    def _replica_for(self, seq: Sequence, preempting: list[bool],
                     hits: list[list[int]]) -> int | None:
        """The decode replica that can take ``seq`` (sharing ``hits[r]``, the cached blocks
        of its prefix), keep the watermark and still grow every running (or arriving)
        sequence by one block (skipping replicas that preempt): most cached blocks first,
        then the least loaded."""
        def order(r: int) -> tuple[int, int]:
            return -len(hits[r]), len(self.running[r]) + len(self.arriving[r])

        for r in sorted(range(len(self.running)), key=order):
            pool, running = self.decode_pools[r], self.running[r] + self.arriving[r]
            if preempting[r] or len(running) >= self.config.max_num_seqs:
                continue
            left = pool.blocks_left([], seq.num_tokens, hits[r])
            if left >= self.watermark_blocks and (not running or left > len(running)):
                return r
        return None

    def abort(self, seq: Sequence) -> None:
        """Removes ``seq`` wherever it is: waiting, in a tier (offloaded, or swapped out in
        the last step), arriving or running on the device; its blocks are freed, its tier
        spans lose a user (freed at the next switch, past its barrier)."""
        if seq.status == SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status == SeqStatus.OFFLOADED:
            (self._preempted if seq in self._preempted else self.offloaded).remove(seq)
            self.book.release(seq)
        elif seq.status == SeqStatus.RUNNING:
            r = seq.replica
            (self.running[r] if seq in self.running[r] else self.arriving[r]).remove(seq)
            self.decode_pools[r].free(seq.block_table)
        seq.status = SeqStatus.FINISHED

    def release_device(self) -> None:
        """Sequences on the device (running, arriving) wait for prefill again; what the
        tiers hold stays."""
        for r in range(len(self.running)):
            for seq in reversed(self.running[r] + self.arriving[r]):
                self.decode_pools[r].free(seq.block_table)
                seq.status = SeqStatus.WAITING
                seq.num_preemptions += 1
                self.num_preemptions += 1
                self.waiting.appendleft(seq)
            self.running[r], self.arriving[r] = [], []

    def reset_prefix_cache(self) -> None:
        for pool in self.prefill_pools + self.decode_pools:
            pool.reset_cache()
        self.book.tier_kv.index.clear()

    def limit_hits(self, accept) -> None:  # noqa: D102
        for pool in self.prefill_pools:
            pool.hit_filter = accept

    def finish(self, seq: Sequence) -> None:
        """Removes a finished sequence (offloaded if its first token ended it, else
        running) and frees what it holds."""
        self.abort(seq)
