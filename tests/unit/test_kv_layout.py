"""KVShardLayout and the prefill -> decode transfer plan, for every plan pair (single process,
as megatron-core tests its kv_reshard planner)."""

from __future__ import annotations

import itertools

import pytest

from seesaw_mcore.config import ParallelConfig
from seesaw_mcore.kv.layout import KVShardLayout, shard_overlaps

L, H = 5, 4  # uneven layer splits for PP 2 and 4


def _layout(text: str) -> KVShardLayout:
    return KVShardLayout(ParallelConfig.parse(text), L, H)


def test_ranges():
    t2p2 = _layout("T2P2")  # ranks: tp fastest, then pp
    assert [t2p2.layer_range(r) for r in range(4)] == [(0, 3), (0, 3), (3, 5), (3, 5)]
    assert [t2p2.head_range(r) for r in range(4)] == [(0, 2), (2, 4), (0, 2), (2, 4)]
    d2p2 = _layout("D2P2")
    assert [d2p2.dp_rank(r) for r in range(4)] == [0, 1, 0, 1]


PAIRS = [("P2", "T2"), ("T2", "P2"), ("D2", "T2"), ("P2", "D2"), ("P4", "T4"), ("P4", "T2P2"),
         ("D2P2", "D2T2"), ("T4", "P4"), ("T2P2", "P4")]


@pytest.mark.parametrize("src,dst", PAIRS)
def test_every_reader_cell_written_exactly_once(src, dst):
    s, d = _layout(src), _layout(dst)
    for sr, dr in itertools.product(range(s.layout.dp), range(d.layout.dp)):
        transfers = shard_overlaps(s, d, sr, dr)
        for reader in (r for r in range(d.layout.world_size) if d.dp_rank(r) == dr):
            covered = {}
            for t in (t for t in transfers if t.dst == reader):
                assert s.dp_rank(t.src) == sr
                for cell in itertools.product(range(*t.layers), range(*t.heads)):
                    assert cell not in covered, (cell, t)
                    covered[cell] = t.src
            want = itertools.product(range(*d.layer_range(reader)), range(*d.head_range(reader)))
            assert set(covered) == set(want)


def test_p2_to_t2_concrete():
    ts = shard_overlaps(_layout("P2"), _layout("T2"))
    assert [(t.src, t.dst, t.layers, t.heads) for t in ts] == [
        (0, 0, (0, 3), (0, 2)), (1, 0, (3, 5), (0, 2)),
        (0, 1, (0, 3), (2, 4)), (1, 1, (3, 5), (2, 4))]


def test_mismatched_plans_rejected():
    with pytest.raises(ValueError, match="world sizes differ"):
        shard_overlaps(_layout("D2"), _layout("T4"))
    with pytest.raises(ValueError, match="replica 1 does not exist in T2"):
        shard_overlaps(_layout("D2"), _layout("T2"), 0, 1)
    with pytest.raises(ValueError, match="TP=8 does not divide 4 KV heads"):
        _layout("T8")
