"""Rollouts a trainer can trust (``tests/distributed/consistency_job.py``, one launch per world
size):

- ``logprobs_mode``: each mode's full-vocabulary logprobs of every sampled token and prompt
  position equal a hand computation (float64 NumPy) from the ``raw_logits`` run's logits and
  the request's processing: penalties over its history, temperature, top-k, top-p of the
  top-k renormalized, min-p; greedy rows unprocessed; prompt positions without penalties.
- routed experts: every prompt and generated token's top-k expert ids per MoE layer equal
  HF's router choices (``output_router_logits``) on Qwen3-MoE (a dense layer among them) and
  Mixtral, under T1, T2, P2:T2, E2 and E2:T2, the second time from the prefix cache.
- batch-invariant mode: a request alone, in a batch of 64 others, and with its prompt's
  first 32 tokens from the prefix cache (the prompt computed in two steps) has bitwise-equal
  tokens and logprobs, greedy and sampled, float32 and bfloat16, under T1, T2 and P2:T2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import launch_worlds
from tests.distributed.consistency_job import (
    INVARIANT_PLANS,
    MODE_PARAMS,
    MODE_PLANS,
    ROUTED_PLANS,
    VOCAB,
    routed_prompts,
)
from tests.distributed.engine_job import PROMPTS

WORLDS = {1: ["T1"], 2: ["T2", "P2:T2", "E2", "E2:T2"]}


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory) -> dict:
    models = ",".join(f"{m}={tiny_models[m]}" for m in ("llama", "qwen3_moe", "mixtral"))
    return launch_worlds("tests.distributed.consistency_job", WORLDS, models, tmp_path_factory,
                         timeout=600)


def dense(entries: list, vocab: int = VOCAB) -> np.ndarray:
    """``[[id, value, rank], ...]`` per position -> ``[positions, vocab]`` float64."""
    out = np.full((len(entries), vocab), np.nan)
    for i, e in enumerate(entries):
        for t, v, _ in e:
            out[i, t] = v
    return out


def processed(logits: np.ndarray, p: dict, history: list[int] | None, prompt_len: int
              ) -> np.ndarray:
    """The request's processing of one position's raw ``logits`` ``[V]`` by hand: penalties
    (vLLM's definitions) over ``history`` (``None``: a prompt position, none), then
    temperature, top-k, top-p over the top-k renormalized, min-p; greedy: penalties only."""
    x = logits.copy()
    if history is not None:
        rep = p.get("repetition_penalty", 1.0)
        for t in set(history):
            x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
        done = history[prompt_len:]
        for t in set(done):
            x[t] -= p.get("frequency_penalty", 0.0) * done.count(t) + p.get("presence_penalty", 0.0)
    if p["temperature"] == 0:
        return x
    x = x / p["temperature"]
    k = p.get("top_k", -1)
    if k > 0:
        x[x < np.sort(x)[-k]] = -np.inf
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    before = np.cumsum(probs[order]) - probs[order]
    keep = np.zeros_like(probs, dtype=bool)
    keep[order[before < p.get("top_p", 1.0)]] = True
    keep &= probs >= p.get("min_p", 0.0) * probs.max()
    return np.where(keep, x, -np.inf)


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x[np.isfinite(x)].max()
    return x - (m + np.log(np.exp(x[np.isfinite(x)] - m).sum()))


@pytest.mark.parametrize("plan", MODE_PLANS)
def test_logprobs_modes_equal_a_hand_computation(results, plan):
    got = results[plan]["modes"]
    for i, p in enumerate(MODE_PARAMS):
        raw = got["raw_logits"][i]
        tokens, prompt = raw["tokens"], PROMPTS[i]
        for mode in ("raw_logprobs", "processed_logits", "processed_logprobs"):
            assert got[mode][i]["tokens"] == tokens, (mode, i)  # the mode changes no draw
        logits = dense(raw["logprobs"])  # [steps, V] raw logits
        prompt_logits = dense(raw["prompt"][1:])  # [L - 1, V]
        assert not np.isnan(logits).any() and not np.isnan(prompt_logits).any()
        for step, row in enumerate(logits):
            hist = prompt + tokens[:step]
            want = {"raw_logprobs": log_softmax(row),
                    "processed_logits": processed(row, p, hist, len(prompt))}
            want["processed_logprobs"] = log_softmax(want["processed_logits"])
            for mode, w in want.items():
                ours = dense([got[mode][i]["logprobs"][step]])[0]
                assert np.array_equal(np.isinf(ours), np.isinf(w)), (mode, i, step)
                fin = np.isfinite(w)
                assert np.abs(ours[fin] - w[fin]).max() < 2e-5, (mode, i, step)
            chosen = got["processed_logprobs"][i]["logprobs"][step][0]
            assert chosen[0] == tokens[step] and np.isfinite(chosen[1])  # drawn from it
        for pos, row in enumerate(prompt_logits):
            w = processed(row, p, None, len(prompt))
            ours = dense([got["processed_logprobs"][i]["prompt"][pos + 1]])[0]
            assert np.array_equal(np.isinf(ours), np.isinf(log_softmax(w)))
            fin = np.isfinite(ours)
            assert np.abs(ours[fin] - log_softmax(w)[fin]).max() < 2e-5, (i, pos)
            ours = dense([got["raw_logprobs"][i]["prompt"][pos + 1]])[0]
            assert np.abs(ours - log_softmax(row)).max() < 2e-5
    greedy = len(MODE_PARAMS) - 1  # processed = raw for a greedy request without penalties
    assert got["processed_logits"][greedy]["logprobs"] == got["raw_logits"][greedy]["logprobs"]


@pytest.fixture(scope="module")
def hf_routes(tiny_models, results) -> dict:
    """HF's router top-k per layer for every fed token of T1's completions (both runs)."""
    out = {}
    for name in ("qwen3_moe", "mixtral"):
        model = hf_moe(tiny_models[name])
        out[name] = [[hf_router_choices(model, p + got["tokens"][:-1])
                      for p, got in zip(prompts, run)]
                     for prompts, run in zip(routed_prompts(), results["T1"]["routed"][name])]
    return out


def hf_moe(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def hf_router_choices(model, ids: list[int]) -> np.ndarray:
    """A loaded HF MoE model's top-k expert ids ``[T, MoE layers, k]`` over ``ids``."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]), output_router_logits=True).router_logits
    k = model.config.num_experts_per_tok
    return np.stack([x.topk(k, -1).indices.numpy() for x in logits if x is not None], 1)


@pytest.mark.parametrize("plan", ROUTED_PLANS)
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_routed_experts_equal_hf_router_choices(results, hf_routes, name, plan):
    runs = results[plan]["routed"][name]
    assert any(r["cached"] for r in runs[1])  # prompts whose prefix came from the cache
    for run, (got, refs) in enumerate(zip(runs, hf_routes[name])):
        for i, (a, ref) in enumerate(zip(got, refs)):
            assert a["dtype"] == "int16"
            assert a["tokens"] == results["T1"]["routed"][name][run][i]["tokens"]
            assert np.array_equal(np.asarray(a["routed"]), ref), (plan, run, i, a["cached"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("plan", INVARIANT_PLANS)
def test_batch_invariant_mode_is_bitwise(results, plan, dtype):
    for kind, cases in results[plan]["invariant"][dtype].items():
        assert cases["hit"]["cached"] == 32
        assert cases["alone"]["cached"] == cases["batch"]["cached"] == 0
        alone = cases["alone"]
        for name in ("batch", "hit"):
            assert cases[name]["tokens"] == alone["tokens"], (kind, name)
            assert cases[name]["logprobs"] == alone["logprobs"], (kind, name)


@pytest.fixture(scope="module")
def moe_with_tokenizer(tmp_path_factory) -> str:
    """A random Qwen3-MoE with the demo model's vocabulary size and tokenizer."""
    import shutil

    from seesaw_mcore.bench.models import build_random
    from tests.conftest import TINY

    model = build_random(str(tmp_path_factory.mktemp("moe") / "moe"), arch="qwen3_moe",
                         num_layers=3, vocab=2048, seed=21, head_dim=16)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(f"{TINY}/{f}", model)
    return model


def decode_routed(enc: dict) -> np.ndarray:
    import base64

    assert enc["dtype"] == "int16"
    return np.frombuffer(base64.b64decode(enc["data"]), "<i2").reshape(enc["shape"])


def test_infer_jsonl_carries_routed_experts_and_processed_logprobs(moe_with_tokenizer, tmp_path):
    """``launch/infer.py`` with ``enable_return_routed_experts`` and a processed
    ``logprobs_mode`` on a Qwen3-MoE with the demo tokenizer: each output's routed experts
    (base64 int16) equal HF's router choices over its tokens; filtered tokens' logprobs are
    ``-9999.0``."""
    import json

    from tests.conftest import launch

    model = moe_with_tokenizer
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"id": f"r{i}", "prompt": t}) + "\n"
                           for i, t in enumerate(["The cat", "Once upon a time there"])))
    proc = launch(1, ["launch.infer", f"model.path={model}", f"data.input={src}",
                      f"data.output={out}", "enable_return_routed_experts=true",
                      "logprobs_mode=processed_logprobs", "sampling=random", "sampling.top_k=2",
                      "sampling.logprobs=3", "sampling.max_tokens=6", "sampling.seed=3"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    hf = hf_moe(model)
    for row in map(json.loads, out.read_text().splitlines()):
        o = row["outputs"][0]
        want = hf_router_choices(hf, row["prompt_token_ids"] + o["token_ids"][:-1])
        assert np.array_equal(decode_routed(o["routed_experts"]), want)
        for step in o["logprobs"]:
            values = sorted(v["logprob"] for v in step.values())
            assert values[0] == -9999.0 and all(v > -100 for v in values[1:])


def test_server_generate_returns_routed_experts_and_processed_logprobs(moe_with_tokenizer):
    """``launch/serve.py`` on two ranks (``P2:T2``) with both options: ``/generate``'s
    ``meta_info.routed_experts`` equal HF's router choices; ``/v1/completions`` logprobs of
    filtered tokens are ``-9999.0`` (valid JSON)."""
    import httpx

    from tests.distributed.test_server import Server

    server = Server(2, [f"model.path={moe_with_tokenizer}", "plan=P2:T2",
                        "cache.host_kv_tokens=4096", "enable_return_routed_experts=true",
                        "logprobs_mode=processed_logprobs"])
    try:
        ids = [[1, 5, 9, 33, 7, 100, 200], [3, 4, 5]]
        r = httpx.post(f"{server.url}/generate", json={
            "input_ids": ids, "return_logprob": True, "top_logprobs_num": 3,
            "sampling_params": {"max_new_tokens": 6, "temperature": 1.0, "top_k": 2,
                                "sampling_seed": 1}}, timeout=60)
        assert r.status_code == 200, r.text
        hf = hf_moe(moe_with_tokenizer)
        for prompt, got in zip(ids, r.json()):
            want = hf_router_choices(hf, prompt + got["output_ids"][:-1])
            assert np.array_equal(decode_routed(got["meta_info"]["routed_experts"]), want)
            tops = got["meta_info"]["output_top_logprobs"]
            assert all(sorted(x[0] for x in step)[0] == -9999.0 for step in tops)
        r = httpx.post(f"{server.url}/v1/completions", json={
            "prompt": "The cat", "max_tokens": 4, "top_k": 2,
            "logprobs": 3, "seed": 2}, timeout=60)
        assert r.status_code == 200, r.text
        top = r.json()["choices"][0]["logprobs"]["top_logprobs"]
        assert all(min(step.values()) == -9999.0 for step in top)
    finally:
        server.kill()
