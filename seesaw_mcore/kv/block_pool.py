"""Device paged-KV block accounting with automatic prefix caching (scheduler side; holds no
tensors): the engine's one KV cache manager. Schedulers only ``match`` cached blocks, take
blocks with ``allocate_slots`` (share the hits, allocate the rest, make full blocks findable,
in one call) and ``free`` them; nothing else shares, allocates or commits.

Prefix caching follows vLLM's semantics. A *full* block is identified by a chain hash: a
128-bit BLAKE2b digest of its parent block's hash and its own token ids (``block_hashes``),
so a hash names the whole prefix up to the block's end and a wrong hit would need a BLAKE2b
collision. The chain's root (``cache_root``) names everything else a block's KV depends on:
the weights' version (an update makes every earlier block unfindable, no flush needed), and
room for an adapter id and a cache salt. One pool serves one layout, and positions are
implied by the chain. Blocks are reference-counted; a
block whose last user is gone keeps its KV and its hash (LRU order) until its memory is
needed; a new sequence takes the longest run of cached full blocks (``match``) and computes
only the rest. A shared block is never written: hits are full blocks before the sequence's
last prompt token, and a sequence writes only past its hits.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import numpy as np

ROOT_HASH = b""  # the parent of a sequence's first block (first weights, no adapter, salt)


def cache_root(weights_version: int = 0, adapter: str | None = None,
               salt: str | None = None) -> bytes:
    """The hash chain's root for sequences whose KV comes from these weights, adapter and
    cache salt (``ROOT_HASH`` for the first weights and neither)."""
    if weights_version == 0 and adapter is None and salt is None:
        return ROOT_HASH
    key = f"weights={weights_version}\x00adapter={adapter}\x00salt={salt}".encode()
    return hashlib.blake2b(key, digest_size=16).digest()


def block_hashes(token_ids: Sequence[int], block_size: int, hashes: list[bytes],
                 root: bytes = ROOT_HASH) -> list[bytes]:
    """Extends ``hashes`` in place to every full block of ``token_ids`` (chained from
    ``root``) and returns it (the hashes already there must be of the same tokens and root:
    callers keep one list per sequence)."""
    full = len(token_ids) // block_size
    if len(hashes) >= full:
        return hashes
    start = len(hashes) * block_size
    toks = np.asarray(token_ids[start:full * block_size], dtype=np.int64)
    parent = hashes[-1] if hashes else root
    for i in range(full - len(hashes)):
        block = toks[i * block_size:(i + 1) * block_size].tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        hashes.append(parent)
    return hashes


class BlockPool:
    """Fixed-size KV blocks handed out to sequences as block tables.

    Args:
        num_blocks: blocks in the device cache.
        block_size: tokens per block.
        enable_caching: keep full blocks' KV after their last user, found by hash.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got "
                             f"{num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_caching = enable_caching
        self._free = list(range(num_blocks - 1, -1, -1))  # stack: pop() gives low ids first
        self._refs = [0] * num_blocks
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached, unused: oldest first
        self._hash_of: dict[int, bytes] = {}  # block -> its hash (cached blocks)
        self._cached: dict[bytes, int] = {}  # hash -> block
        self.num_evicted = 0  # cached blocks whose memory was taken back
        # a prefill takes only hits this accepts (by hash): routed experts kept for them
        self.hit_filter: Callable[[bytes], bool] | None = None

    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given: never used, or cached with no user."""
        return len(self._free) + len(self._lru)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The longest run of cached blocks for a prefix's ``hashes`` (no reference
        taken)."""
        out: list[int] = []
        if not self.enable_caching:
            return out
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def blocks_left(self, table: list[int], num_tokens: int, shared: Sequence[int] = ()
                    ) -> int:
        """Free blocks left once ``table``, after taking the cached blocks ``shared``, grows
        to hold ``num_tokens`` tokens (negative: that many missing)."""
        need = self.blocks_for(num_tokens) - len(table) - len(shared)
        idle = sum(1 for b in shared if self._refs[b] == 0)  # leave the free count
        return self.num_free - idle - need

    def can_allocate(self, table: list[int], num_tokens: int, shared: Sequence[int] = ()
                     ) -> bool:
        """Whether ``table``, after taking the cached blocks ``shared``, can grow to hold
        ``num_tokens`` tokens."""
        return self.blocks_left(table, num_tokens, shared) >= 0

    def allocate_slots(self, table: list[int], num_tokens: int, hit: Sequence[int] = (),
                       hashes: Sequence[bytes] = ()) -> bool:
        """Grows ``table`` to hold ``num_tokens`` tokens: the cached blocks ``hit`` (from
        ``match``, for an empty table) shared, then new blocks; the full blocks of
        ``hashes`` become findable (``_commit``). Returns False, changing nothing, when the
        blocks are not there."""
        if not self.can_allocate(table, num_tokens, hit):
            return False
        self._share(table, hit)
        self._allocate(table, num_tokens)
        self._commit(table, hashes)
        return True

    def _share(self, table: list[int], blocks: Sequence[int]) -> None:
        """Appends cached ``blocks`` (from ``match``) to ``table``, one reference each."""
        for b in blocks:
            if b not in self._hash_of:
                raise RuntimeError(f"block {b} is shared but not cached (a bug)")
            if self._refs[b] == 0:
                del self._lru[b]
            self._refs[b] += 1
            table.append(b)

    def _allocate(self, table: list[int], num_tokens: int) -> None:
        """Grows ``table`` in place to hold ``num_tokens`` tokens; takes never-used blocks
        first, then the least recently used cached ones (their hashes are dropped).

        Raises:
            RuntimeError: if not enough blocks are free (call ``can_allocate`` first).
        """
        need = self.blocks_for(num_tokens) - len(table)
        if need > self.num_free:
            raise RuntimeError(f"out of KV blocks: need {need}, have {self.num_free}")
        for _ in range(max(need, 0)):
            if self._free:
                b = self._free.pop()
            else:
                b, _ = self._lru.popitem(last=False)
                del self._cached[self._hash_of.pop(b)]
                self.num_evicted += 1
            self._refs[b] = 1
            table.append(b)

    def _commit(self, table: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Makes the full blocks ``table[i]`` findable by ``hashes[i]``. Their KV is written
        by the step that scheduled them, before any reader later in that step: within a
        micro-batch, attention writes a layer's new KV before it reads; micro-batches keep
        the order in which sequences were scheduled, and a stage runs them one after
        another (``tests/unit/test_prefix_cache.py`` checks a same-step reader comes
        after its writer). A hash already cached in another block keeps the first block."""
        if not self.enable_caching:
            return
        for b, h in zip(table, hashes):
            if b not in self._hash_of and h not in self._cached:
                self._cached[h], self._hash_of[b] = b, h

    def in_use(self, block: int) -> bool:
        """Whether some sequence holds ``block``."""
        return self._refs[block] > 0

    def free(self, table: list[int]) -> None:
        """Drops ``table``'s references and empties it. A block with no user left returns
        to the pool; a cached one keeps its KV until taken back (tail blocks first, so a
        shared prefix outlives the suffixes that used it)."""
        for b in reversed(table):
            if self._refs[b] <= 0:
                raise RuntimeError(f"KV block {b} freed with no user (a double free; a bug)")
            self._refs[b] -= 1
            if self._refs[b] == 0:
                if b in self._hash_of:
                    self._lru[b] = None
                else:
                    self._free.append(b)
        table.clear()

    def writable(self, table: Sequence[int], pos: int) -> bool:
        """Whether the step may write position ``pos`` of ``table``: its block has this one
        user (a shared block is never written)."""
        return self._refs[table[pos // self.block_size]] == 1

    def check(self) -> None:
        """Raises unless the books balance: every block is free, cached-unused or in use
        (exactly one), counts are never negative, the hash maps agree."""
        free, lru = set(self._free), set(self._lru)
        used = {b for b, r in enumerate(self._refs) if r > 0}
        bad = [b for b, r in enumerate(self._refs) if r < 0]
        if bad or len(free) != len(self._free) or free & lru or (free | lru) & used:
            raise RuntimeError(f"block pool books broken: negative {bad}, free/cached/used "
                               f"overlap {sorted((free & lru) | ((free | lru) & used))}")
        if len(free) + len(lru) + len(used) != self.num_blocks:
            raise RuntimeError("block pool books broken: blocks lost")
        if any(self._cached.get(h) != b for b, h in self._hash_of.items()) or \
                len(self._cached) != len(self._hash_of) or not lru <= set(self._hash_of):
            raise RuntimeError("block pool books broken: hash maps disagree")

    def reset_cache(self) -> None:
        """Forgets every cached block (their KV is about to be overwritten: a phase switch,
        new weights). Blocks in use stay in use, uncached."""
        for b in self._lru:
            self._free.append(b)
        self._lru.clear()
        self._hash_of.clear()
        self._cached.clear()


def pools_usage(pools: list[BlockPool]) -> float:
    """Share of the blocks of ``pools`` that sequences hold (cached blocks with no user
    count as free)."""
    total = sum(p.num_blocks for p in pools)
    return sum(p.num_blocks - p.num_free for p in pools) / total if total else 0.0
