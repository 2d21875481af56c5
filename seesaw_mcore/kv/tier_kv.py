"""Sequences' KV in the host and disk tiers, with shared prefixes stored once (scheduler
side; no tensors).

A sequence's tier KV is a list of ``Piece``s covering its token positions ``[0, n)`` in
order; each piece is a run of a ``Span`` (a slot range in one tier) that may be shared by
several sequences and is reference-counted. With sharing on, the host-tier full blocks are
indexed by the chain hash of ``kv.block_pool`` (hash of block ``i`` -> the pieces of the
sequence that stored it): a sequence stored later whose prefix is already in the tier takes
those pieces (one more user each) and writes only the rest into a span of its own. A span
whose last user is gone is returned for freeing (the caller frees it once no rank can still
read it) and leaves the index. Disk-tier spans are never shared: their records are whole
``O_DIRECT`` pages, and a block inside one is not page-aligned in general.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from seesaw_mcore.contract import HOST, KVMove, SlotRange


@dataclass(eq=False)
class Span:
    """A slot range in a tier holding KV of one or more sequences."""

    slots: SlotRange
    users: int = 1
    hashes: list[bytes] = field(default_factory=list)  # index entries that point into it


@dataclass(frozen=True)
class Piece:
    """Positions ``[pos, pos + length)`` of a sequence, at ``span.slots.start + offset``."""

    span: Span
    offset: int
    length: int
    pos: int

    def slots(self) -> SlotRange:
        r = self.span.slots
        return SlotRange(r.start + self.offset, self.length, r.tier)


def truncate(pieces: list[Piece], num_tokens: int) -> list[Piece]:
    """The pieces covering positions ``[0, num_tokens)``."""
    out = []
    for p in pieces:
        if p.pos >= num_tokens:
            break
        out.append(Piece(p.span, p.offset, min(p.length, num_tokens - p.pos), p.pos))
    return out


def moves(seq_id: int, pieces: list[Piece], table: list[int], block_size: int,
          skip_tokens: int = 0) -> list[KVMove]:
    """The ``KVMove``s between ``pieces`` and the blocks ``table`` (position ``p`` in block
    ``table[p // block_size]``), leaving out the first ``skip_tokens`` (whole blocks already
    on the device). Pieces start at block boundaries."""
    out = []
    for p in pieces:
        if p.pos + p.length <= skip_tokens:
            continue
        cut = max(skip_tokens - p.pos, 0)
        first = (p.pos + cut) // block_size
        r = p.slots()
        if cut and r.tier != HOST:
            raise RuntimeError("a disk record is read whole; skip only host pieces (a bug)")
        out.append(KVMove(seq_id, SlotRange(r.start + cut, r.length - cut, r.tier),
                          table[first:]))
    return out


class TierKV:
    """Who holds which tier slots, and the host-tier prefix index.

    Args:
        allocate: slots for ``n`` tokens in the first tier with room, or ``None``.
        block_size: tokens per KV block (the hash granularity).
        sharing: store a prefix that the host tier already holds once.
    """

    def __init__(self, allocate: Callable[[int], SlotRange | None], block_size: int,
                 sharing: bool) -> None:
        self.allocate, self.block_size, self.sharing = allocate, block_size, sharing
        self.index: dict[bytes, tuple[list[Piece], int]] = {}  # hash of block i -> (pieces, i)
        self.shared_tokens = 0  # tokens stored by reference, not written again

    def lookup(self, hashes: list[bytes]) -> list[Piece]:
        """The pieces holding the longest prefix of ``hashes`` the host tier has."""
        for i in range(len(hashes) - 1, -1, -1):
            hit = self.index.get(hashes[i]) if self.sharing else None
            if hit is not None:
                return truncate(hit[0], (i + 1) * self.block_size)
        return []

    def store(self, hashes: list[bytes], num_tokens: int) -> tuple[list[Piece], int] | None:
        """Places a sequence's KV of ``num_tokens`` tokens (full-block ``hashes``): the
        longest prefix already in the host tier by reference, the rest in a new span.

        Returns:
            ``(pieces, first)``: its pieces and the first position that must be written
            (into the last piece); ``None`` when no tier has room (nothing taken).
        """
        hashes = hashes[:num_tokens // self.block_size]
        shared = self.lookup(hashes)
        first = shared[-1].pos + shared[-1].length if shared else 0
        pieces = list(shared)
        if first < num_tokens:
            slots = self.allocate(num_tokens - first)
            if slots is None:
                return None
            span = Span(slots)
            pieces.append(Piece(span, 0, num_tokens - first, first))
            if self.sharing and slots.tier == HOST:
                for i in range(first // self.block_size, len(hashes)):
                    if hashes[i] not in self.index:
                        self.index[hashes[i]] = (pieces, i)
                        span.hashes.append(hashes[i])
        for p in shared:
            p.span.users += 1
        self.shared_tokens += first
        return pieces, first

    def release(self, pieces: list[Piece]) -> list[SlotRange]:
        """Drops one user of each piece's span; returns the spans left with none (out of
        the index now; the caller frees their slots)."""
        dead = []
        for p in pieces:
            span = p.span
            span.users -= 1
            if span.users == 0:
                for h in span.hashes:
                    entry = self.index.get(h)
                    if entry is not None and any(q.span is span for q in entry[0]):
                        del self.index[h]
                dead.append(span.slots)
        return dead
