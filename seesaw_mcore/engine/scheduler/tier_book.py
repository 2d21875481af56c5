"""The Seesaw scheduler's book of the KV tiers: the host tier's slots (and the disk tier's,
when configured, filled after the host's), which sequences' KV they hold, and the slots that
die with a sequence's last user but are reused only after the next switch (whose barrier
ensures no rank still reads or writes them)."""

from __future__ import annotations

import copy

from seesaw_mcore.contract import DISK, HOST, KVMove, SlotRange
from seesaw_mcore.engine.request import SeqStatus, Sequence
from seesaw_mcore.kv.block_pool import block_hashes
from seesaw_mcore.kv.slots import SlotAllocator
from seesaw_mcore.kv.tier_kv import Piece, TierKV


class TierBook:
    """Tier slots and the offloaded sequences' KV in them (no tensors).

    Args:
        host_slots: token slots of the host tier.
        disk_slots: token slots of the disk tier (0: none).
        disk_align: the disk tier's slot granularity (its page, in tokens).
        block_size: tokens per device block.
        enable_caching: a prefix the host tier holds is shared by reference.
    """

    def __init__(self, host_slots: int, disk_slots: int, disk_align: int, block_size: int,
                 enable_caching: bool) -> None:
        self.block_size = block_size
        self.tiers = {HOST: SlotAllocator(host_slots, HOST)}  # filled in this order
        if disk_slots:
            self.tiers[DISK] = SlotAllocator(disk_slots, DISK, disk_align)
        self.tier_kv = TierKV(self._allocate, block_size, enable_caching)
        self._kv: dict[int, list[Piece]] = {}  # seq id -> its KV in the tiers (OFFLOADED)
        self.dead: list[SlotRange] = []  # freed at the next switch
        self._dead_reserved = 0  # tier slots the dead ranges take

    def _allocate(self, n: int) -> SlotRange | None:
        """Slots for ``n`` tokens in the first tier with room (host, then disk)."""
        for tier in self.tiers.values():
            if tier.can_allocate(n):
                return tier.allocate(n)
        return None

    def hashes(self, seq: Sequence) -> list[bytes]:
        """``seq``'s full-block hashes (none without prefix caching)."""
        if not self.tier_kv.sharing:
            return []
        return block_hashes(seq.all_token_ids, self.block_size, seq.block_hashes,
                            seq.hash_root)

    def pieces(self, seq: Sequence) -> list[Piece]:
        """Where ``seq``'s KV lies in the tiers, in token order."""
        return self._kv[seq.seq_id]

    def fits(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether ``seq``'s first ``num_tokens`` tokens of KV fit (a shared prefix is free)."""
        shared = self.tier_kv.lookup(self.hashes(seq)[:num_tokens // self.block_size])
        need = num_tokens - (shared[-1].pos + shared[-1].length if shared else 0)
        return need <= 0 or any(t.can_allocate(need) for t in self.tiers.values())

    def store(self, seq: Sequence, table: list[int], num_tokens: int) -> list[KVMove]:
        """Places ``seq``'s KV of ``num_tokens`` tokens in the tiers (a prefix the host tier
        holds by reference; ``seq`` is then offloaded) and returns the move that writes the
        rest from ``table``; the caller checked there is room."""
        stored = self.tier_kv.store(self.hashes(seq), num_tokens)
        if stored is None:
            raise RuntimeError(f"no tier room for sequence {seq.seq_id} (a bug)")
        pieces, first = stored
        self._kv[seq.seq_id] = pieces
        seq.status = SeqStatus.OFFLOADED
        if first >= num_tokens:
            return []
        return [KVMove(seq.seq_id, pieces[-1].slots(), table[first // self.block_size:])]

    def release(self, seq: Sequence) -> None:
        """``seq``'s KV has left the tiers (admitted, finished): its spans lose a user; the
        dead ones are freed at the next switch."""
        for r in self.tier_kv.release(self._kv.pop(seq.seq_id)):
            self.dead.append(r)
            self._dead_reserved += self.tiers[r.tier].reserved(r.length)

    def free_dead(self) -> None:
        """At a switch (past its barrier): the dead slots are free again."""
        for r in self.dead:
            self.tiers[r.tier].free(r)
        self.dead.clear()
        self._dead_reserved = 0

    def usage(self, on_device_tokens: int) -> float:
        """The tiers' load: KV still to decode, as a fraction of their slots - what waits in
        them (dead ranges excluded) plus ``on_device_tokens`` decoding on the device, whose
        home they are (it goes back there at a hand-back)."""
        total = sum(t.num_slots for t in self.tiers.values())
        held = sum(t.used for t in self.tiers.values()) - self._dead_reserved
        return (held + on_device_tokens) / total

    def can_hand_back(self, on_device: list[Sequence], next_tokens: int) -> bool:
        """Whether, after the next switch, every sequence ``on_device`` can be swapped out
        to a tier and then a prompt of ``next_tokens`` tokens still fits (tried on a copy)."""
        tiers = copy.deepcopy(self.tiers)
        for r in self.dead:
            tiers[r.tier].free(r)
        for seq in on_device:
            tier = next((t for t in tiers.values() if t.can_allocate(seq.num_tokens - 1)), None)
            if tier is None:
                return False
            tier.allocate(seq.num_tokens - 1)
        return any(t.can_allocate(next_tokens) for t in tiers.values())
