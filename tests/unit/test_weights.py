"""ShardStore: both phases' shards per rank, identical tensors stored once; the weight-update
group's lifetime."""

from __future__ import annotations

import pytest
import torch

from seesaw_mcore.config import ModelConfig, PhasePlan
from seesaw_mcore.model.loader import Checkpoint, load_shard
from seesaw_mcore.runtime.weights import ShardStore, shard_spec


def _nbytes(shard: dict) -> int:
    return sum(t.numel() * t.element_size() for t in shard.values())


def test_p2_to_t2_shards_and_dedup(tiny_models):
    ckpt = Checkpoint(ModelConfig.from_pretrained(tiny_models["llama3"]))
    plan = PhasePlan.parse("P2", "T2")
    for rank in range(2):
        store = ShardStore(ckpt, plan, rank, torch.float32)
        for layout in (plan.prefill, plan.decode):
            want = load_shard(ckpt, shard_spec(layout, rank), torch.float32)
            got = store.shard(layout)
            assert got.keys() == want.keys()
            assert all(torch.equal(got[k], want[k]) for k in want)
        pre, dec = store.shard(plan.prefill), store.shard(plan.decode)
        # norms are replicated across TP: the rank's prefill layers' norms are shared, not
        # copied (P2 over 5 layers: rank 0 holds layers 0-2, rank 1 layers 3-4)
        first = (0, 3)[rank]
        assert dec[f"layers.{first}.input_norm.weight"] is pre["layers.0.input_norm.weight"]
        assert dec[f"layers.{first}.qkv.weight"] is not pre["layers.0.qkv.weight"]
        assert store.unique_bytes < _nbytes(pre) + _nbytes(dec)


def test_static_plan_stored_once(tiny_models):
    ckpt = Checkpoint(ModelConfig.from_pretrained(tiny_models["llama"]))
    store = ShardStore(ckpt, PhasePlan.parse("T2"), 0, torch.float32)
    assert len(store.shards) == 1
    assert store.unique_bytes == _nbytes(store.shard(PhasePlan.parse("T2").prefill))


def test_weight_update_group_closes_once_and_refuses_after():
    from seesaw_mcore.errors import SeesawError
    from seesaw_mcore.runtime.weight_sync import WeightUpdateGroup
    from tests.conftest import free_test_port

    group = WeightUpdateGroup("127.0.0.1", free_test_port(), rank=0, world_size=1)
    assert torch.equal(group.broadcast(torch.arange(4)), torch.arange(4))
    group.close()
    group.close()
    with pytest.raises(SeesawError, match=r"^the weight-update group is closed$"):
        group.broadcast(torch.arange(4))
