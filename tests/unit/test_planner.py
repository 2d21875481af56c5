"""The planner: the Appendix-A cost model against hand-computed values, only valid plans
ranked, the paper's qualitative result on its presets, clear errors, the CLI's JSON."""

from __future__ import annotations

import json
import math

import pytest

from seesaw_mcore.config import ParallelConfig, layout_error
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.planner import (
    GIB,
    PRESETS,
    CostModel,
    Hardware,
    ModelShape,
    Workload,
    layouts,
)
from seesaw_mcore.planner.__main__ import main

# 2 layers, hidden 4, MLP 8, 2 query / 2 KV heads of dim 2, vocab 10 (untied):
# layer params = 4 * (2 + 2 * 2) * 2 (qkv) + 2 * 2 * 4 (o) + 3 * 4 * 8 (MLP) = 160
SHAPE = ModelShape(num_layers=2, hidden_size=4, intermediate_size=8, num_heads=2,
                   num_kv_heads=2, head_dim=2, vocab_size=10, tie_word_embeddings=False)
T2 = ParallelConfig(tp=2)


def _hw(**kw) -> Hardware:
    base = dict(name="toy", mem_gib=1, mem_gbs=1, tflops=1e-9, allreduce_gbs=1, p2p_gbs=1,
                host_link_gbs=1)
    return Hardware(**{**base, **kw})


def test_layer_params():
    assert SHAPE.layer_params == 160
    assert SHAPE.params == 2 * 160 + 2 * 10 * 4


def test_decode_layer_time_compute_bound_by_hand():
    # peak 1000 FLOP/s. TP=2, 4 sequences, context 10, per rank: 80 params, 1 q / 1 kv head.
    model = CostModel(SHAPE, _hw())
    linear = max(80 * 2 / GIB, 2 * 4 * 80 / 1000)  # weights read vs 640 FLOPs: 0.64 s
    attn = max(2 * 4 * 10 * 1 * 2 * 2 / GIB, 4 * 4 * 10 * 1 * 2 / 1000)  # 0.32 s
    net = 2 * (2 * (2 - 1) / 2 * 4 * 4 * 2 / GIB)  # two ring all-reduces of [4, 4] fp16
    assert model.layer_time(T2, 4, 1, 10, prefill=False) == pytest.approx(linear + attn + net)
    assert linear == pytest.approx(0.64) and attn == pytest.approx(0.32)


def test_prefill_layer_time_memory_bound_by_hand():
    model = CostModel(SHAPE, _hw(tflops=1e6))  # compute free: bytes decide
    # 3 prompts of 5 tokens, no TP: 160 params read; KV written: 2 * 15 tokens * 2 heads * 2
    expected = 160 * 2 / GIB + 2 * 15 * 2 * 2 * 2 / GIB
    assert model.layer_time(ParallelConfig(), 3, 5, 5, prefill=True) == pytest.approx(expected)


def test_decode_batch_from_memory_left_after_weights():
    hw = _hw(mem_gib=2000 / GIB, mem_utilization=1.0)
    model = CostModel(SHAPE, hw)
    # T2 rank: (2 layers * 160 + embedding and LM head 2 * 10 * 4) params / 2 * 2 bytes = 400
    assert model.weight_bytes(T2) == 400
    assert model.kv_bytes_per_token(T2) == 2 * 2 * 1 * 2 * 2  # 16 bytes
    wl = Workload("toy", 6, 8)  # mean context 6 + 8 / 2 = 10 tokens
    assert model.decode_batch(T2, wl) == (2000 - 400) // (16 * 10)


def _llama(layers, hidden, inter, heads, kv, vocab=32000) -> ModelShape:
    return ModelShape(layers, hidden, inter, heads, kv, hidden // heads, vocab, False)


LLAMA15 = _llama(48, 5120, 13824, 40, 40)
LLAMA70 = _llama(80, 8192, 28672, 64, 8)


@pytest.mark.parametrize("shape,gpu,world", [
    (LLAMA15, "a10", 4), (LLAMA15, "l4", 8), (LLAMA70, "a10", 8), (LLAMA70, "a100", 8),
    (SHAPE, "a10", 4), (_llama(6, 512, 1408, 8, 4, 8000), "a100", 4)])
@pytest.mark.parametrize("workload", ["sharegpt", "arxiv"])
def test_only_valid_plans_ranked(shape, gpu, world, workload):
    from seesaw_mcore.planner import WORKLOADS

    model = CostModel(shape, PRESETS[gpu])
    rows = model.rank(world, WORKLOADS[workload])
    assert rows and [r["tokens_per_s"] for r in rows] == sorted(
        (r["tokens_per_s"] for r in rows), reverse=True)
    budget = PRESETS[gpu].mem_gib * GIB * PRESETS[gpu].mem_utilization
    for r in rows:
        p, d = ParallelConfig.parse(r["prefill"]), ParallelConfig.parse(r["decode"])
        assert p.world_size == d.world_size == world and p.dp == d.dp
        for lay in (p, d):
            assert layout_error(lay, shape.num_heads, shape.num_kv_heads,
                                shape.intermediate_size, shape.num_layers) is None
            assert model.weight_bytes(lay) < budget
        assert r["decode_batch"] >= 1 and math.isfinite(r["tokens_per_s"])


def test_paper_result_on_pcie_and_nvlink():
    from seesaw_mcore.planner import WORKLOADS

    best = CostModel(LLAMA15, PRESETS["a10"]).rank(4, WORKLOADS["arxiv"])
    static = max(r["tokens_per_s"] for r in best if r["prefill"] == r["decode"])
    assert (best[0]["prefill"], best[0]["decode"]) == ("P4", "T4")  # PCIe: PP prefill, TP decode
    assert best[0]["tokens_per_s"] / static > 1.1
    nvlink = CostModel(LLAMA70, PRESETS["a100"]).rank(8, WORKLOADS["sharegpt"])
    static = max(r["tokens_per_s"] for r in nvlink if r["prefill"] == r["decode"])
    assert nvlink[0]["tokens_per_s"] / static < 1.05  # NVLink: little left to gain


def test_layouts_of_a_world():
    assert sorted(map(str, layouts(4))) == sorted(
        ["P4", "T2P2", "T4", "D2P2", "D2T2", "D4"])


def _config(tmp_path, **over) -> str:
    cfg = dict(num_hidden_layers=80, hidden_size=8192, intermediate_size=28672,
               num_attention_heads=64, num_key_value_heads=8, vocab_size=32000)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**cfg, **over}))
    return str(path)


def test_cli_json(tmp_path, capsys):
    assert main(["--model", _config(tmp_path), "--gpu", "a10", "--num-gpus", "8",
                 "--workload", "arxiv", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {"prefill", "decode", "predicted_tokens_per_s", "ranking"} <= set(out)
    assert (out["prefill"], out["decode"]) == (out["ranking"][0]["prefill"],
                                               out["ranking"][0]["decode"])
    assert out["predicted_tokens_per_s"] == out["ranking"][0]["tokens_per_s"]
    assert all(ParallelConfig.parse(r["prefill"]).world_size == 8 for r in out["ranking"])


@pytest.mark.parametrize("args,message", [
    (["--gpu", "a10", "--num-gpus", "2"],
     "error: the model (128.5 GiB of weights) fits no layout of 2 x a10 (24 GiB each): no "
     "layout leaves room for its KV cache"),
    (["--gpu", "h100", "--num-gpus", "8"],
     "error: unknown gpu 'h100'; presets: a10, l4, a100, measure"),
    (["--gpu", "a10", "--num-gpus", "8", "--workload", "chat"],
     "error: unknown workload 'chat'; presets: sharegpt, arxiv"),
    (["--gpu", "a10", "--num-gpus", "0"], "error: --num-gpus must be >= 1, got 0"),
])
def test_cli_errors(tmp_path, capsys, args, message):
    assert main(["--model", _config(tmp_path), *args]) == 1
    assert capsys.readouterr().err.strip() == message


def test_config_errors(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"num_hidden_layers": 2, "hidden_size": 4}))
    with pytest.raises(SeesawError, match=f"^model config {path} has no num_attention_heads$"):
        ModelShape.from_config(str(tmp_path))
    with pytest.raises(SeesawError, match="^cannot read model config"):
        ModelShape.from_config(str(tmp_path / "missing.json"))
