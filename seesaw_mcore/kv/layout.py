"""Which part of the KV cache each rank owns under a parallel layout, and how KV moves
between a prefill layout and a decode layout through the host tier.

The host tier is ``[layers, 2, kv_heads, token_slots, head_dim]`` (heads-major), so a rank's
``[layer_range, :, head_range]`` slice is a few contiguous runs: the layers of its pipeline
stage (megatron-core's split of layers over PP ranks) and the KV heads of its TP rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from seesaw_mcore.config import ParallelConfig, split_layers


@dataclass(frozen=True)
class KVShardLayout:
    """KV ownership of every rank under one parallel layout.

    Attributes:
        layout: the parallel layout.
        num_layers: decoder layers of the model.
        num_kv_heads: KV heads of the model (TP must divide it).
    """

    layout: ParallelConfig
    num_layers: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        if self.num_kv_heads % self.layout.tp:
            raise ValueError(f"TP={self.layout.tp} does not divide {self.num_kv_heads} KV heads")
        if self.layout.pp > self.num_layers:
            raise ValueError(f"PP={self.layout.pp} > {self.num_layers} layers")

    def layer_range(self, rank: int) -> tuple[int, int]:
        """``[start, end)`` of the layers whose KV ``rank`` holds."""
        _, _, pp_rank = self.layout.coords(rank)
        return split_layers(self.num_layers, self.layout.pp)[pp_rank]

    def head_range(self, rank: int) -> tuple[int, int]:
        """``[start, end)`` of the KV heads ``rank`` holds."""
        _, tp_rank, _ = self.layout.coords(rank)
        per = self.num_kv_heads // self.layout.tp
        return tp_rank * per, (tp_rank + 1) * per

    def dp_rank(self, rank: int) -> int:
        return self.layout.coords(rank)[0]


@dataclass(frozen=True)
class ShardOverlap:
    """One rectangle of a sequence's KV that ``dst`` reads and ``src`` wrote."""

    src: int
    dst: int
    layers: tuple[int, int]
    heads: tuple[int, int]


def shard_overlaps(
    src: KVShardLayout, dst: KVShardLayout, src_replica: int = 0, dst_replica: int = 0
) -> list[ShardOverlap]:
    """Every (writer, reader) overlap for a sequence prefilled by DP replica ``src_replica``
    under ``src`` and decoded by replica ``dst_replica`` under ``dst``.

    The host tier is shared by the node, so the DP degree may differ between the layouts
    (``D2 -> T2``): the writing replica's ranks cover the whole model between them, and so do
    the reading replica's.

    The runtime never needs this list (each rank writes and reads its own slice of the
    shared tier); it stays as the statement the tests check for every layout pair: the
    readers' rectangles tile the writers' exactly, so the hand-over loses and doubles
    nothing.
    """
    if (src.num_layers, src.num_kv_heads) != (dst.num_layers, dst.num_kv_heads):
        raise ValueError("source and destination layouts describe different models")
    if src.layout.world_size != dst.layout.world_size:
        raise ValueError(f"{src.layout} -> {dst.layout}: world sizes differ")
    for lay, rep in ((src, src_replica), (dst, dst_replica)):
        if not 0 <= rep < lay.layout.dp:
            raise ValueError(f"replica {rep} does not exist in {lay.layout}")
    world = src.layout.world_size
    writers = [r for r in range(world) if src.dp_rank(r) == src_replica]
    readers = [r for r in range(world) if dst.dp_rank(r) == dst_replica]
    out: list[ShardOverlap] = []
    for d in readers:
        for s in writers:
            layers = _overlap(src.layer_range(s), dst.layer_range(d))
            heads = _overlap(src.head_range(s), dst.head_range(d))
            if layers and heads:
                out.append(ShardOverlap(s, d, layers, heads))
    return out


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None
