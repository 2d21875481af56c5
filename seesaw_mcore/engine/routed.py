"""Routed experts for router replay (``enable_return_routed_experts``), kept on rank 0.

Every step, the last pipeline stage returns, per sequence, the expert ids each MoE layer
chose for the tokens the step fed (``SampledToken.routed``: ``[fed, MoE layers, top_k]``
int16, the earlier stages' layers passed along with the hidden states). A sequence's rows
are written by position into ``Sequence.routed``; a completion returns the rows of every
token that went through the model: the prompt and every generated token but the last
(``[prompt + generated - 1, MoE layers, top_k]``, vLLM's shape).

Prefix-cache hits skip the forward of their positions, so the rows of every full block that
becomes findable are kept here by the block's chain hash (which names the whole prefix and
the weights' version), and a hit's rows are copied from them. A block whose rows are no
longer kept is not taken as a hit (``known``: the scheduler recomputes it), so a hit never
lacks rows. The store is a bounded LRU: hits touch their entries.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from seesaw_mcore.engine.request import Sequence


class RoutedExperts:
    """Rank 0's routed-expert rows: per sequence (on the ``Sequence``) and per cached block.

    Args:
        moe_layers: MoE layers of the model.
        top_k: experts per token.
        block_size: tokens per KV block.
        capacity: cached blocks whose rows are kept (LRU beyond).
    """

    def __init__(self, moe_layers: int, top_k: int, block_size: int, capacity: int) -> None:
        self.shape = (moe_layers, top_k)
        self.block_size, self.capacity = block_size, max(capacity, 1)
        self._blocks: OrderedDict[bytes, np.ndarray] = OrderedDict()  # hash -> [bs, L, k]

    def known(self, block_hash: bytes) -> bool:
        """Whether a cached block's rows are kept (and keeps them longest: a hit's)."""
        if block_hash in self._blocks:
            self._blocks.move_to_end(block_hash)
            return True
        return False

    def add(self, seq: Sequence, routed: bytes) -> None:
        """Writes a step's rows of ``seq`` (before its new token is appended: the step fed
        its last ``len(rows)`` tokens), first copying a prefix-cache hit's rows, then makes
        its full blocks' rows findable."""
        rows = np.frombuffer(routed, dtype=np.int16).reshape(-1, *self.shape)
        end = seq.num_tokens
        start = end - len(rows)
        if seq.routed is None or len(seq.routed) < end:  # grown geometrically
            cap = max(end, 2 * len(seq.routed) if seq.routed is not None else 0)
            grown = np.zeros((cap, *self.shape), dtype=np.int16)
            if seq.routed is not None:
                grown[:seq.routed_filled] = seq.routed[:seq.routed_filled]
            seq.routed = grown
        bs = self.block_size
        for b in range(seq.routed_filled // bs, start // bs):  # a prefix-cache hit's blocks
            block = self._blocks.get(seq.block_hashes[b])
            if block is None:
                raise RuntimeError(f"sequence {seq.seq_id}: no routed experts kept for its "
                                   f"cached block {b} (a bug)")
            seq.routed[b * bs:(b + 1) * bs] = block
        seq.routed[start:end] = rows
        seq.routed_filled = max(seq.routed_filled, end)
        for b in range(start // bs, min(len(seq.block_hashes), end // bs)):  # now full
            h = seq.block_hashes[b]
            if h not in self._blocks:
                self._blocks[h] = seq.routed[b * bs:(b + 1) * bs].copy()
                if len(self._blocks) > self.capacity:
                    self._blocks.popitem(last=False)

    def clear(self) -> None:
        """Forgets every cached block's rows (the prefix cache was reset)."""
        self._blocks.clear()
