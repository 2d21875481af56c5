"""Scheduler-side allocator of contiguous token-slot ranges in a KV tier (no torch)."""

from __future__ import annotations

import bisect

from seesaw_mcore.contract import HOST, SlotRange


class SlotAllocator:
    """First-fit allocator of contiguous slot ranges; frees merge with their neighbours.

    Args:
        num_slots: token slots in the tier.
        tier: the tier the ranges belong to (``HOST`` or ``DISK``).
        align: every range starts at a multiple of ``align`` and reserves a multiple of it
            (the disk tier's aligned records); the returned length is the one asked for.
    """

    def __init__(self, num_slots: int, tier: str = HOST, align: int = 1) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots, self.tier, self.align = num_slots - num_slots % align, tier, align
        self._free: list[tuple[int, int]] = [(0, self.num_slots)] if self.num_slots else []
        self.used = 0

    def reserved(self, length: int) -> int:
        """Slots a range of ``length`` tokens takes (rounded up to ``align``)."""
        return -(-length // self.align) * self.align

    def can_allocate(self, length: int) -> bool:
        need = self.reserved(length)
        return any(n >= need for _, n in self._free)

    def allocate(self, length: int) -> SlotRange:
        """The first free range that fits ``length`` slots.

        Raises:
            RuntimeError: if no free range is long enough (call ``can_allocate`` first).
        """
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        need = self.reserved(length)
        for i, (start, n) in enumerate(self._free):
            if n >= need:
                if n == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, n - need)
                self.used += need
                return SlotRange(start, length, self.tier)
        raise RuntimeError(f"{self.tier} tier has no free range of {length} slots")

    def free(self, r: SlotRange) -> None:
        """Returns a range; adjacent free ranges merge."""
        i = bisect.bisect_left(self._free, (r.start, 0))
        start, n = r.start, self.reserved(r.length)
        end = start + n
        if i < len(self._free) and self._free[i][0] == end:  # merge right
            n += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == start:  # merge left
            start, left = self._free[i - 1]
            n += left
            self._free[i - 1] = (start, n)
        else:
            self._free.insert(i, (start, n))
        self.used -= self.reserved(r.length)
