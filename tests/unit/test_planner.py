"""The planner: the Appendix-A cost model and each calibrated term against hand-computed
values, only valid plans ranked, the paper's qualitative result and the GPU presets' picks,
clear errors, the CLI's JSON shape, the trial's choice on a fake engine."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from seesaw_mcore.config import ParallelConfig, layout_error
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.planner import (
    GIB,
    PRESETS,
    WORKLOADS,
    CostModel,
    EngineLimits,
    Hardware,
    ModelShape,
    Workload,
    layouts,
    workload,
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
    wl = Workload("toy", 6, 8)  # mean context 6 + 8 / 2 = 10 tokens: one block of 16
    assert model.decode_batch(T2, wl) == (2000 - 400) // (16 * 16)
    exact = CostModel(SHAPE, hw, EngineLimits(block_size=1))
    assert exact.decode_batch(T2, wl) == (2000 - 400) // (16 * 10)


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
    # the shape scripts read: the same keys as before the calibrated model
    assert set(out) == {"prefill", "decode", "predicted_tokens_per_s", "ranking", "hardware",
                        "workload"}
    assert all(set(r) == {"prefill", "decode", "requests_per_s", "tokens_per_s",
                          "prefill_tokens_per_s", "decode_tokens_per_s", "prefill_batch",
                          "decode_batch"} for r in out["ranking"])
    assert {"name", "mem_gib", "mem_gbs", "tflops", "allreduce_gbs", "p2p_gbs", "host_link_gbs",
            "host_gib", "dtype_bytes", "allreduce_latency_s", "p2p_latency_s",
            "mem_utilization"} <= set(out["hardware"])  # and the software terms
    assert set(out["workload"]) == {"name", "prompt_len", "output_len"}
    assert (out["prefill"], out["decode"]) == (out["ranking"][0]["prefill"],
                                               out["ranking"][0]["decode"])
    assert out["predicted_tokens_per_s"] == out["ranking"][0]["tokens_per_s"]
    assert all(ParallelConfig.parse(r["prefill"]).world_size == 8 for r in out["ranking"])


@pytest.mark.parametrize("args,message", [
    (["--gpu", "a10", "--num-gpus", "2"],
     "error: the model (128.5 GiB of weights) fits no layout of 2 x a10 (24 GiB each): no "
     "layout leaves room for its KV cache"),
    (["--gpu", "b200", "--num-gpus", "8"],
     "error: unknown gpu 'b200'; presets: a10, l4, a100, h100, h200, measure"),
    (["--gpu", "a10", "--num-gpus", "8", "--workload", "chat"],
     "error: unknown workload 'chat'; presets: sharegpt, arxiv, or mean lengths as "
     "PROMPT:OUTPUT (e.g. 40:85)"),
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


# -- the calibrated terms, each against a hand computation -------------------------------

def _soft(**kw) -> Hardware:
    """Bytes and FLOPs free (huge bandwidth and peak): only the named costs remain."""
    base = dict(name="soft", mem_gib=1, mem_gbs=1e12, tflops=1e12, allreduce_gbs=1e12,
                p2p_gbs=1e12, host_link_gbs=1e12)
    return Hardware(**{**base, **kw})


def test_layer_fixed_cost_and_its_pipeline_variant():
    model = CostModel(SHAPE, _soft(layer_s=3e-4, pp_layer_s=5e-4))
    assert model.layer_time(ParallelConfig(), 4, 1, 10, False) == pytest.approx(3e-4)
    assert model.layer_time(ParallelConfig(pp=2), 4, 1, 10, False) == pytest.approx(5e-4)
    no_pp = CostModel(SHAPE, _soft(layer_s=3e-4))  # pp_layer_s 0: the same as layer_s
    assert no_pp.layer_time(ParallelConfig(pp=2), 4, 1, 10, False) == pytest.approx(3e-4)


def test_decode_attention_at_the_measured_attention_bandwidth():
    # 4 sequences x context 1000 x 2 KV heads x dim 2 x 2 bytes x (K, V) = 64,000 bytes
    kv = 2 * 4 * 1000 * 2 * 2 * 2
    model = CostModel(SHAPE, _soft(attn_gbs=2.0))
    assert model.layer_time(ParallelConfig(), 4, 1, 1000, False) == pytest.approx(
        kv / (2.0 * GIB))
    unset = CostModel(SHAPE, _soft(mem_gbs=4.0))  # attn_gbs 0: memory bandwidth
    weights = SHAPE.layer_params * 2 / (4.0 * GIB)
    assert unset.layer_time(ParallelConfig(), 4, 1, 1000, False) == pytest.approx(
        weights + kv / (4.0 * GIB))


def test_step_fixed_costs_micro_batches_and_sends_by_hand():
    hw = _soft(step_s=1e-3, tp_step_s=4e-4, layer_s=1e-4, pp_layer_s=2e-4, microbatch_s=3e-5,
               p2p_latency_s=2e-5, allreduce_latency_s=1e-5)
    model = CostModel(SHAPE, hw)
    # T2: step + TP step + one micro-batch through 2 layers, each with two all-reduces
    assert model.step_time(T2, 1, 8, 1, 20, False) == pytest.approx(
        1e-3 + 4e-4 + 2 * (1e-4 + 2 * 1e-5))
    # P2, 2 micro-batches: 3 stage slots of (1 layer + one send), no TP
    send = 2e-5 + 3e-5
    assert model.send_time(4) == pytest.approx(send)
    assert model.step_time(ParallelConfig(pp=2), 2, 4, 1, 20, False) == pytest.approx(
        1e-3 + 3 * (2e-4 + send))
    # D2: each replica its own step, no TP or PP cost
    assert model.step_time(ParallelConfig(dp=2), 1, 4, 1, 20, False) == pytest.approx(
        1e-3 + 2 * 1e-4)


def test_lm_head_time_by_hand():
    model = CostModel(SHAPE, _hw(mem_gbs=1, tflops=1e-9))  # 1000 FLOP/s
    # vocab 10 x hidden 4 / TP 2 = 20 params: 40 bytes vs 2 x 3 rows x 20 = 120 FLOPs
    assert model.head_time(T2, 3) == pytest.approx(max(40 / GIB, 120 / 1000))


def test_switch_cost_per_fill_of_the_host_tier():
    hw = _soft(switch_s=2e-3, host_link_gbs=1.0)
    wl = Workload("toy", 6, 10)
    # a host-tier slot: 2 layers x 2 KV heads x dim 2 x 2 bytes x (K, V) = 32 bytes/token
    tier = 32 * 16 * 100  # 100 requests of 16 tokens
    model = CostModel(SHAPE, hw, EngineLimits(host_tier_bytes=tier))
    assert model.requests_per_fill(wl, 2) == pytest.approx(100)
    assert model.switch_time(T2) == pytest.approx(2e-3 + model.weight_bytes(T2) / GIB)
    views = CostModel(SHAPE, _soft(switch_s=2e-3, switch_copies_weights=False))
    assert views.switch_time(T2) == pytest.approx(2e-3)  # CPU ranks: the stage views
    capped = CostModel(SHAPE, hw, EngineLimits(host_tier_bytes=tier, num_requests=40))
    assert capped.requests_per_fill(wl, 2) == 40  # a job smaller than one fill
    # a pair's request time: its two phases plus two switches per fill of 100 requests
    seesaw = CostModel(SHAPE, _soft(switch_s=2e-3, switch_copies_weights=False, step_s=1e-3),
                       EngineLimits(host_tier_bytes=tier)).predict(ParallelConfig(pp=2), T2, wl)
    t = (wl.prompt_len / seesaw["prefill_tokens_per_s"]
         + wl.output_len / seesaw["decode_tokens_per_s"] + 2 * 2e-3 / 100)
    assert seesaw["requests_per_s"] == pytest.approx(1 / t)


def test_decode_batch_caps_by_sequences_requests_blocks_and_fill():
    hw = _hw(mem_gib=1e6, mem_utilization=1.0)
    wl = Workload("toy", 6, 8)
    assert CostModel(SHAPE, hw, EngineLimits(max_num_seqs=7)).decode_batch(T2, wl) == 7
    d2 = ParallelConfig(dp=2)
    assert CostModel(SHAPE, hw, EngineLimits(num_requests=9)).decode_batch(d2, wl) == 5
    # 12 blocks of 16 tokens hold 12 sequences of context 10 (one block each)
    assert CostModel(SHAPE, hw, EngineLimits(kv_blocks=12)).decode_batch(T2, wl) == 12
    tier = 32 * 14 * 3  # three requests of 14 tokens per fill
    model = CostModel(SHAPE, hw, EngineLimits(host_tier_bytes=tier))
    assert model.predict(ParallelConfig(pp=2), T2, wl)["decode_batch"] == 3
    assert model.predict(T2, T2, wl)["decode_batch"] > 3  # a static plan has no fills


def test_prefill_batch_from_the_jobs_token_budget_and_kv():
    hw = _hw(mem_gib=1e6, mem_utilization=1.0)
    wl = Workload("toy", 100, 8)
    model = CostModel(SHAPE, hw, EngineLimits(max_prefill_tokens=1000))
    assert model.prefill_batch(T2, wl) == 10
    assert model.prefill_batch(ParallelConfig(pp=4), wl) == 10  # the job's limit holds
    default = CostModel(SHAPE, hw)  # a throughput job: a prompt per PP micro-batch
    assert default.prefill_batch(ParallelConfig(tp=1), wl) == 40
    assert default.prefill_batch(ParallelConfig(pp=2), Workload("long", 3000, 8)) == 8
    small = CostModel(SHAPE, hw, EngineLimits(max_prefill_tokens=1000, kv_blocks=21))
    assert small.prefill_batch(T2, wl) == 3  # 21 blocks of 16 hold 3 prompts of 112 tokens


def test_workload_as_mean_lengths():
    assert workload("40:85") == Workload("40:85", 40, 85)
    with pytest.raises(SeesawError, match="prompt and output lengths must be >= 1 token"):
        workload("0:85")


# -- the GPU presets: the picks docs/planner.md explains term by term ---------------------------

LLAMA8 = _llama(32, 4096, 14336, 32, 8, 128256)


@pytest.mark.parametrize("shape,gpu,world,wl,pick", [
    (LLAMA15, "a10", 4, "arxiv", ("P4", "T4")),  # PCIe: prefill all-reduces are dear
    (LLAMA15, "a10", 4, "sharegpt", ("P4", "T4")),
    (LLAMA70, "h100", 8, "sharegpt", ("D2T4", "D2T4")),  # NVLink: no re-sharding
    (LLAMA70, "h200", 8, "sharegpt", ("D4T2", "D4T2")),  # 141 GB: two GPUs hold 70B
    (LLAMA8, "h100", 8, "sharegpt", ("D8", "D8")),  # one GPU holds 8B: pure DP
    (LLAMA8, "h200", 4, "arxiv", ("D4", "D4")),
])
def test_gpu_preset_picks(shape, gpu, world, wl, pick):
    from seesaw_mcore.planner import WORKLOADS

    best = CostModel(shape, PRESETS[gpu]).rank(world, WORKLOADS[wl])[0]
    assert (best["prefill"], best["decode"]) == pick


def test_presets_name_their_sources():
    import importlib
    import inspect

    text = inspect.getsource(importlib.import_module("seesaw_mcore.planner.hardware"))
    for source in ("Seesaw paper's Table 1", "H100 Tensor Core GPU datasheet",
                   "H200 Tensor Core GPU datasheet"):
        assert source in text
    assert set(PRESETS) == {"a10", "l4", "a100", "h100", "h200"}


# -- the trial's choice, on a fake engine ------------------------------------------------

class _FakeEngine:
    def __init__(self, plan):
        self.plan, self.moves = plan, []

    def use_plan(self, plan):
        self.plan = plan
        self.moves.append(plan.to_string())


def _timing(plan, seconds: float, prefill: bool):
    from seesaw_mcore.contract import Phase, SamplingSpec, ScheduledSeq, SchedulerOutput, Step
    from seesaw_mcore.engine.stats import StepTiming

    spec = SamplingSpec(0.0, 0, 1.0, 0, 0, None)
    n = 8 if prefill else 1
    seqs = [ScheduledSeq(i, [5] * n, 0 if prefill else 20, [0], spec) for i in range(4)]
    phase = Phase.PREFILL if prefill else Phase.DECODE
    lay = plan.prefill if prefill else plan.decode
    step = Step([SchedulerOutput(phase, [seqs])] + [None] * (lay.dp - 1))
    return StepTiming(phase, False, seconds, step)


def test_trial_runs_the_favourite_last_and_picks_the_fastest_measured():
    from seesaw_mcore.config import PhasePlan
    from seesaw_mcore.planner.trial import PlanTrial

    model = CostModel(SHAPE, _soft(step_s=1e-3))
    wl = Workload("toy", 8, 8)
    rows = [model.predict(ParallelConfig.parse(p), ParallelConfig.parse(d), wl)
            for p, d in (("T2", "T2"), ("P2", "T2"), ("D2", "D2"))]
    trial = PlanTrial(model, wl, rows, decode_steps=2, max_seqs=4, max_tokens=100)
    assert [c.plan.to_string() for c in trial.candidates] == ["P2:T2", "D2", "T2"]
    engine = _FakeEngine(PhasePlan.parse("P2", "T2"))
    slow = {"P2:T2": 5.0, "D2": 1.0, "T2": 10.0}  # seconds per step: D2 is the fastest
    for _ in range(3):
        trial.before_step(engine)
        plan = engine.plan
        for prefill in (True, False, False, False):  # the first decode step is not measured
            trial.observe(_timing(plan, slow[plan.to_string()] * 1e-3, prefill))
    trial.before_step(engine)
    assert trial.done and trial.chosen.plan.to_string() == "D2"
    assert engine.moves == ["D2", "T2", "D2"]  # P2:T2 ran first without a move
    measured = {c["plan"]: c["measured_tokens_per_s"] for c in trial.summary()["candidates"]}
    assert measured["D2"] > measured["P2:T2"] > measured["T2"]


def test_trial_admits_its_sequences_by_count_and_prompt_tokens():
    from seesaw_mcore.planner.trial import PlanTrial

    model = CostModel(SHAPE, _soft())
    wl = Workload("toy", 8, 8)
    rows = [model.predict(T2, T2, wl), model.predict(ParallelConfig(pp=2), T2, wl)]

    class Seq:
        def __init__(self, n):
            self.prompt_token_ids = [1] * n

    trial = PlanTrial(model, wl, rows, max_seqs=3, max_tokens=50)
    trial.add(Seq(60))  # the first always fits
    assert not trial.room()  # a prefill step's worth of tokens
    trial = PlanTrial(model, wl, rows, max_seqs=3, max_tokens=500)
    for _ in range(3):
        assert trial.room()
        trial.add(Seq(10))
    assert not trial.room()


def test_kv_too_small_for_the_workload_names_the_fix():
    model = CostModel(SHAPE, _hw(mem_gib=1e6), EngineLimits(kv_blocks=1, block_size=4))
    with pytest.raises(SeesawError, match=r"^no layout's KV cache holds one sequence of "
                       r"workload sharegpt \(mean context 330\.305 tokens\); give the job's "
                       r"lengths as workload=PROMPT:OUTPUT or raise the KV cache$"):
        model.rank(2, workload("sharegpt"))


# SHAPE's attention with 4 experts (MLP 2 each, top 2) in both layers:
# attention 64, routers 4 x 4 = 16, experts 3 x 4 x 2 = 24 each
MOE = ModelShape(num_layers=2, hidden_size=4, intermediate_size=8, num_heads=2,
                 num_kv_heads=2, head_dim=2, vocab_size=10, tie_word_embeddings=False,
                 num_experts=4, experts_per_tok=2, expert_intermediate_size=2, moe_layers=2)


def test_moe_params_memory_and_flops_by_hand():
    assert MOE.layer_params == 64 + 16 + 4 * 24  # memory: every expert
    assert MOE.active_layer_params == 64 + 16 + 2 * 24  # FLOPs: the routed two
    model = CostModel(MOE, _hw())
    e2 = ParallelConfig(dp=2, ep=2)
    # E2: half the experts per rank; T2: every expert, half of each
    assert model.weight_bytes(e2) == pytest.approx((2 * (80 + 2 * 24) + 2 * 10 * 4) * 2)
    assert model.weight_bytes(T2) == pytest.approx((2 * 176 + 2 * 10 * 4) * 2 / 2)
    # 4 tokens, one rank, compute-bound (1000 FLOP/s): dense 2 x 4 x 80, experts 2 x 4 x 2 x 24
    assert model._linear_time(ParallelConfig(), 4) == pytest.approx(0.64 + 0.384)
    # E2: each rank computes its experts' share of both replicas' tokens (the same FLOPs)
    # and sends each routed row to the other rank and back
    hw = model.hw
    a2a = 2 * (hw.allreduce_latency_s + 4 * 2 / 2 * 4 * 2 / (hw.allreduce_gbs * GIB))
    assert model._linear_time(e2, 4) == pytest.approx(0.64 + 0.384 + a2a)
    # uniform routing: 4 tokens reach 4 x (1 - (1 - 2/4)^4) = 3.75 experts on average
    assert MOE.experts_touched(4) == pytest.approx(3.75)


def test_moe_models_rank_expert_parallel_layouts():
    qwen3_30b = ModelShape(num_layers=48, hidden_size=2048, intermediate_size=6144,
                           num_heads=32, num_kv_heads=4, head_dim=128, vocab_size=151936,
                           tie_word_embeddings=False, num_experts=128, experts_per_tok=8,
                           expert_intermediate_size=768, moe_layers=48)
    assert ParallelConfig.parse("E8") in layouts(8, experts=128)
    assert not any(lay.ep > 1 for lay in layouts(8))  # dense models: no E layouts
    rows = CostModel(qwen3_30b, PRESETS["h100"]).rank(8, WORKLOADS["sharegpt"])
    plans = {(r["prefill"], r["decode"]) for r in rows}
    assert {("E8", "E8"), ("E8", "T4P2"), ("T4P2", "E8"), ("T4P2", "T4P2")} <= plans
    # 3B of 30B parameters active: every rank reading only its 16 experts wins (uniform
    # routing assumed); T8 is no candidate (4 KV heads)
    assert (rows[0]["prefill"], rows[0]["decode"]) == ("E8", "E8")
    assert "T8" not in {r["decode"] for r in rows}


def test_topology_a_collective_spanning_two_domains_runs_at_the_link_between():
    a10 = PRESETS["a10"]  # 8-GPU PCIe server: two groups of 4 behind separate sockets
    assert a10.link_gbs(a10.allreduce_gbs, 4) == 16 and a10.link_gbs(a10.allreduce_gbs, 8) == 6
    assert PRESETS["h100"].link_gbs(419, 8) == 419  # one NVLink domain of 8
    assert PRESETS["h100"].link_gbs(419, 16) == 46.6  # two boards: the network
    model = CostModel(SHAPE, _hw(domain_size=2, cross_domain_gbs=0.5))
    # T4 spans two domains: its all-reduces at 0.5 GiB/s instead of 1
    wide = model.layer_time(ParallelConfig(tp=4), 4, 1, 10, prefill=False)
    flat = CostModel(SHAPE, _hw()).layer_time(ParallelConfig(tp=4), 4, 1, 10, prefill=False)
    nbytes = 4 * 4 * 2
    assert wide - flat == pytest.approx(2 * 2 * 3 / 4 * nbytes * (1 / 0.5 - 1) / GIB)


def test_topology_changes_the_paper_picks_to_p8_t4p2():
    """On the paper's 8 x A10 servers, T8's all-reduces cross the sockets: the decode
    layout becomes T4P2 (the paper's own 8-GPU pick: P8 -> T4P2)."""
    code34 = _llama(48, 8192, 22016, 64, 8)
    best = CostModel(code34, PRESETS["a10"]).rank(8, WORKLOADS["arxiv"])[0]
    assert (best["prefill"], best["decode"]) == ("P8", "T4P2")
    flat = dataclasses.replace(PRESETS["a10"], domain_size=0)
    best = CostModel(code34, flat).rank(8, WORKLOADS["arxiv"])[0]
    assert (best["prefill"], best["decode"]) == ("P8", "T8")
