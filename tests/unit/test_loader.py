"""Shard cutting from safetensors: slices reassemble to the full tensors; every bad checkpoint
gives one clear error."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from seesaw_mcore.config import ModelConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model.loader import Checkpoint, ShardSpec, load_shard


def _full(path: str) -> dict[str, torch.Tensor]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def _shards(path: str, tp: int, pp: int) -> dict[tuple[int, int], dict]:
    ckpt = Checkpoint(ModelConfig.from_pretrained(path))
    return {(t, p): load_shard(ckpt, ShardSpec(tp, t, pp, p), torch.float32)
            for t in range(tp) for p in range(pp)}


@pytest.mark.parametrize("model", ["llama", "qwen2", "llama3"])
def test_tp2_shards_reassemble(tiny_models, model):
    path = tiny_models[model]
    full, cfg = _full(path), ModelConfig.from_pretrained(path)
    shards = _shards(path, 2, 1)
    d, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    q = torch.cat([s[(t, 0)]["layers.1.qkv.weight"][: hq // 2 * d]
                   for t, s in zip(range(2), [shards] * 2)])
    assert torch.equal(q, full["model.layers.1.self_attn.q_proj.weight"])
    k = torch.cat([shards[(t, 0)]["layers.1.qkv.weight"][hq // 2 * d: (hq + hkv) // 2 * d]
                   for t in range(2)])
    assert torch.equal(k, full["model.layers.1.self_attn.k_proj.weight"])
    down = torch.cat([shards[(t, 0)]["layers.0.down.weight"] for t in range(2)], dim=1)
    assert torch.equal(down, full["model.layers.0.mlp.down_proj.weight"])
    emb = torch.cat([shards[(t, 0)]["embed.weight"] for t in range(2)])
    assert torch.equal(emb[: cfg.vocab_size], full["model.embed_tokens.weight"])
    assert not emb[cfg.vocab_size:].any()  # vocab padding rows are zero
    head_src = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    head = torch.cat([shards[(t, 0)]["lm_head.weight"] for t in range(2)])
    assert torch.equal(head[: cfg.vocab_size], full[head_src])


def test_pp_stage_holds_only_its_layers(tiny_models):
    shards = _shards(tiny_models["llama3"], 1, 2)  # 5 layers -> 3 + 2
    first, last = shards[(0, 0)], shards[(0, 1)]
    assert "embed.weight" in first and "lm_head.weight" not in first
    assert "lm_head.weight" in last and "embed.weight" not in last
    assert {k.split(".")[1] for k in first if k.startswith("layers.")} == {"0", "1", "2"}
    full = _full(tiny_models["llama3"])
    assert torch.equal(last["layers.0.input_norm.weight"],
                       full["model.layers.3.input_layernorm.weight"])


def test_fused_qkv_and_gate_up(tiny_models, tmp_path):
    src = tiny_models["qwen2"]
    fused = tmp_path / "fused"
    shutil.copytree(src, fused)
    t = load_file(str(fused / "model.safetensors"))
    for i in range(3):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias"):
            t[p + f"self_attn.qkv_proj.{kind}"] = torch.cat(
                [t.pop(p + f"self_attn.{n}_proj.{kind}") for n in "qkv"])
        t[p + "mlp.gate_up_proj.weight"] = torch.cat(
            [t.pop(p + "mlp.gate_proj.weight"), t.pop(p + "mlp.up_proj.weight")])
    save_file(t, str(fused / "model.safetensors"))
    for tp_rank in range(2):
        a = _shards(src, 2, 1)[(tp_rank, 0)]
        b = _shards(str(fused), 2, 1)[(tp_rank, 0)]
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_sharded_index_checkpoint(tiny_models):
    files = [f for f in os.listdir(tiny_models["llama3"]) if f.endswith(".safetensors")]
    assert len(files) > 1 and os.path.exists(
        os.path.join(tiny_models["llama3"], "model.safetensors.index.json"))
    assert _shards(tiny_models["llama3"], 1, 1)[(0, 0)]["layers.4.down.weight"].shape == (64, 128)


@pytest.fixture
def broken(tiny_models, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(tiny_models["llama"], dst)
    return dst


def _open(path) -> None:
    Checkpoint(ModelConfig.from_pretrained(str(path)))


def test_truncated_file(broken):
    f = broken / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(SeesawError, match=r"^checkpoint file .*model.safetensors is truncated "
                       r"or corrupt: "):
        _open(broken)


def test_missing_weights_file(broken):
    os.remove(broken / "model.safetensors")
    with pytest.raises(SeesawError, match=r"^no model.safetensors or "
                       r"model.safetensors.index.json in "):
        _open(broken)


def test_missing_shard_listed_in_index(tiny_models, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(tiny_models["llama3"], dst)
    victim = sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))[-1]
    os.remove(dst / victim)
    with pytest.raises(SeesawError, match=f"checkpoint file .*{victim} listed in "
                       "model.safetensors.index.json is missing"):
        _open(dst)


def test_missing_tensor(broken):
    t = load_file(str(broken / "model.safetensors"))
    del t["model.layers.2.mlp.up_proj.weight"]
    save_file(t, str(broken / "model.safetensors"))
    with pytest.raises(SeesawError, match=r"^tensor model.layers.2.mlp.up_proj.weight is "
                       r"missing from the checkpoint in "):
        _open(broken)


def test_shape_mismatch_config_lies_about_heads(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SeesawError, match=r"^tensor model.layers.0.self_attn.k_proj.weight has "
                       r"shape \[32, 64\] but config.json implies \[64, 64\]$"):
        _open(broken)


def test_wrong_dtype(broken):
    t = load_file(str(broken / "model.safetensors"))
    t["model.norm.weight"] = t["model.norm.weight"].to(torch.int32)
    save_file(t, str(broken / "model.safetensors"))
    with pytest.raises(SeesawError, match=r"^tensor model.norm.weight has dtype I32; "):
        _open(broken)


def test_pickle_only_checkpoint_refused(broken):
    os.remove(broken / "model.safetensors")
    (broken / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SeesawError, match=r"has only pickle weights \(\*.bin/\*.pt\), which are "
                       r"never loaded"):
        _open(broken)
