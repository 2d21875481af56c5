"""The vLLM offline API on the engine: prompt logprobs equal HF's teacher-forced
log-softmax (fp32, 1e-4) under T1, T2, P2 and P2 -> T2, also when decode recomputes
prompts; penalties and min_tokens against a direct computation on HF logits."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import launch_worlds
from tests.distributed.vllm_api_job import MAX_TOKENS, PENALTIES, PROMPTS

WORLDS = {1: ["T1"], 2: ["T2", "P2", "P2:T2"]}
CASES = [p + s for ps in WORLDS.values() for p in ps for s in ("", "+preempt")]


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory) -> dict[str, dict]:
    return launch_worlds("tests.distributed.vllm_api_job", WORLDS, tiny_models["llama"],
                         tmp_path_factory)


@pytest.fixture(scope="module")
def hf(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32,
                                                use_safetensors=True).eval()


@pytest.mark.parametrize("case", CASES)
def test_prompt_logprobs_match_hf_teacher_forcing(results, hf, case):
    rep = results[case]
    if case.endswith("+preempt"):
        assert rep["preemptions"] > 0  # some prompts were recomputed
    for prompt, got in zip(PROMPTS, rep["prompt_logprobs"]):
        with torch.no_grad():
            logp = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # [L, V]
        assert got[0] is None and len(got) == len(prompt)
        for pos in range(1, len(prompt)):
            entry, row = got[pos], logp[pos - 1]
            actual = prompt[pos]
            first = next(iter(entry))
            assert int(first) == actual  # the actual token first
            assert abs(entry[first]["logprob"] - float(row[actual])) < 1e-4
            assert entry[first]["rank"] == int((row > row[actual]).sum()) + 1
            top = row.topk(3)
            for r, (tid, val) in enumerate(zip(top.indices.tolist(), top.values.tolist()), 1):
                assert abs(entry[str(tid)]["logprob"] - val) < 1e-4
                if tid != actual:
                    assert entry[str(tid)]["rank"] == r


def _penalized_greedy(hf, prompt: list[int]) -> list[int]:
    """Greedy decoding on HF logits with vLLM's penalty definitions, by hand."""
    out: list[int] = []
    for _ in range(MAX_TOKENS):
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float()
        for t in set(prompt + out):
            rp = PENALTIES["repetition_penalty"]
            logits[t] = logits[t] / rp if logits[t] > 0 else logits[t] * rp
        for t in set(out):
            logits[t] -= PENALTIES["frequency_penalty"] * out.count(t)
            logits[t] -= PENALTIES["presence_penalty"]
        out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("plan", ["T1", "T2", "P2:T2+preempt"])
def test_penalties_match_a_direct_computation(results, hf, plan):
    rep = results[plan]
    want = [_penalized_greedy(hf, p) for p in PROMPTS]
    assert rep["penalized"] == want
    assert rep["penalized"] != rep["greedy"]  # they changed something


@pytest.mark.parametrize("plan", ["T1", "P2:T2"])
def test_min_tokens_holds_back_stop_tokens(results, plan):
    rep = results[plan]
    for toks, stop, reason in zip(rep["min_tokens"], rep["stops"],
                                  rep["min_tokens_reasons"]):
        assert len(toks) >= 5 and stop not in toks[:5]
        if stop in toks:  # after min_tokens it ends the completion, kept in token_ids
            assert toks[-1] == stop and reason == stop


def test_a_vllm_script_runs_unchanged():
    import os

    from tests.conftest import REPO, launch

    proc = launch(1, ["tests.distributed.vllm_script", os.path.join(REPO, "models",
                                                                    "tiny-llama")],
                  timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.splitlines()[-1] == "ALL OK"
