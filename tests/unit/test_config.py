"""ParallelConfig notation, layer splits, vocab padding and layout validation errors."""

from __future__ import annotations

import json
import shutil

import pytest

from seesaw_mcore.config import (
    ModelConfig,
    ParallelConfig,
    check_world,
    padded_vocab_size,
    split_layers,
)
from seesaw_mcore.errors import SeesawError


@pytest.mark.parametrize("text,dp,tp,pp,canon", [
    ("T2", 1, 2, 1, "T2"), ("p4", 1, 1, 4, "P4"), ("D2P4", 2, 1, 4, "D2P4"),
    ("T4P2", 1, 4, 2, "T4P2"), ("P2T4", 1, 4, 2, "T4P2"), ("T1", 1, 1, 1, "T1"),
    ("D2T2P2", 2, 2, 2, "D2T2P2"),
])
def test_parse_and_str(text, dp, tp, pp, canon):
    lay = ParallelConfig.parse(text)
    assert (lay.dp, lay.tp, lay.pp) == (dp, tp, pp)
    assert str(lay) == canon


@pytest.mark.parametrize("text,msg", [
    ("", "invalid parallel layout ''"),
    ("X2", "invalid parallel layout 'X2'"),
    ("T2T2", "invalid parallel layout 'T2T2': 'T' given twice"),
    ("T0", "parallel degree tp=0 must be an integer >= 1"),
    ("T2 P2", "invalid parallel layout 'T2 P2'"),
])
def test_parse_errors(text, msg):
    with pytest.raises(SeesawError, match="^" + msg.replace("(", r"\(")):
        ParallelConfig.parse(text)


def test_rank_coords_follow_megatron_order():
    lay = ParallelConfig.parse("D2T2P2")
    assert [lay.coords(r) for r in range(8)] == [
        (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 1), (1, 1, 1)]
    assert all(lay.rank_of(*lay.coords(r)) == r for r in range(8))


def test_split_layers_uneven():
    assert split_layers(5, 2) == [(0, 3), (3, 5)]
    assert split_layers(5, 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]
    assert split_layers(3, 1) == [(0, 3)]


def test_padded_vocab():
    assert padded_vocab_size(250, 1) == 256
    assert padded_vocab_size(301, 2) == 384
    assert padded_vocab_size(256, 4, multiple=1) == 256
    with pytest.raises(SeesawError, match="vocab padding multiple must be >= 1, got 0"):
        padded_vocab_size(10, 2, multiple=0)


def test_world_size_mismatch():
    with pytest.raises(SeesawError, match=r"^layout T2P2 needs DP x TP x PP = 1 x 2 x 2 = 4 "
                       r"ranks, but the world size is 2$"):
        check_world(ParallelConfig.parse("T2P2"), 2)


@pytest.mark.parametrize("layout,msg", [
    ("T8", "layout T8: TP=8 does not divide num_attention_heads=4"),
    ("T4", "layout T4: TP=4 does not divide num_key_value_heads=2"),
    ("P4", "layout P4: PP=4 is greater than num_hidden_layers=3"),
])
def test_layout_errors(tiny_models, layout, msg):
    cfg = ModelConfig.from_pretrained(tiny_models["llama"])
    with pytest.raises(SeesawError, match="^" + msg + "$"):
        cfg.check_layout(ParallelConfig.parse(layout))


def test_unsupported_architecture(tiny_models, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_models["llama"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SeesawError, match=r"^unsupported architectures \['GPT2LMHeadModel'\]"):
        ModelConfig.from_pretrained(str(bad))


def test_missing_model_dir(tmp_path):
    with pytest.raises(SeesawError, match="is not a directory"):
        ModelConfig.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(SeesawError, match="has no config.json"):
        ModelConfig.from_pretrained(str(tmp_path))


def test_reads_hf_fields(tiny_models):
    cfg = ModelConfig.from_pretrained(tiny_models["qwen2"])
    assert cfg.architecture == "Qwen2ForCausalLM"
    assert cfg.qkv_bias and cfg.tie_word_embeddings
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
    l3 = ModelConfig.from_pretrained(tiny_models["llama3"])
    assert l3.rope_parameters["rope_type"] == "llama3"


@pytest.mark.parametrize("kwargs,msg", [
    ({"block_size": 0}, "cache.block_size must be >= 1, got 0"),
    ({"num_blocks": 0}, "cache.num_blocks must be >= 1, got 0"),
    ({"kv_cache_gib": 0}, "cache.kv_cache_gib must be > 0, got 0"),
    ({"host_kv_tokens": 0}, "cache.host_kv_tokens must be >= 1, got 0"),
    ({"host_kv_gib": -1}, "cache.host_kv_gib must be > 0, got -1"),
    ({"prefetch_watermark": 1.0}, r"cache.prefetch_watermark must be in \[0, 1\), got 1.0"),
    ({"disk_kv_tokens": 0}, "cache.disk_kv_tokens must be >= 1, got 0"),
    ({"disk_kv_gib": 0}, "cache.disk_kv_gib must be > 0, got 0"),
])
def test_cache_config_errors(kwargs, msg):
    from seesaw_mcore.config import CacheConfig

    with pytest.raises(SeesawError, match="^" + msg + "$"):
        CacheConfig(**kwargs)


@pytest.mark.parametrize("arch,kw,window", [
    ("mistral", {"sliding_window": 64}, 64),
    ("mistral", {"sliding_window": 4096}, None),  # covers the whole 512-token context
    ("mistral", {"sliding_window": None}, None),
    ("qwen3", {}, None),  # Qwen2/Qwen3 set sliding_window but use_sliding_window is off
])
def test_sliding_window_is_honoured_or_refused(tmp_path, arch, kw, window):
    from seesaw_mcore.bench.models import build_random
    from seesaw_mcore.config import ModelConfig

    cfg = ModelConfig.from_pretrained(build_random(str(tmp_path / "m"), arch=arch, num_layers=1,
                                                   **kw))
    assert cfg.sliding_window == window
    cfg.check_context(64)  # every sequence fits in the window (or there is none)
    if window is not None:
        with pytest.raises(SeesawError) as e:
            cfg.check_context(65)
        assert str(e.value) == (
            "MistralForCausalLM uses sliding-window attention (window 64 tokens), which this "
            "engine runs only while every sequence fits in the window; set "
            "model.max_model_len <= 64 (it is 65)")


def test_moe_config_and_layout_errors(tmp_path):
    from seesaw_mcore.bench.models import build_random
    from seesaw_mcore.config import ModelConfig, ParallelConfig

    cfg = ModelConfig.from_pretrained(build_random(
        str(tmp_path / "m"), arch="qwen3_moe", num_layers=3, heads=4, kv_heads=4,
        intermediate=12))
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.expert_intermediate_size,
            cfg.moe_layers, cfg.norm_topk_prob) == (4, 2, 6, (0, 2), True)
    cfg.check_layout(ParallelConfig.parse("T2"))
    with pytest.raises(SeesawError) as e:
        cfg.check_layout(ParallelConfig.parse("T4"))
    assert str(e.value) == "layout T4: TP=4 does not divide the experts' intermediate size 6"
