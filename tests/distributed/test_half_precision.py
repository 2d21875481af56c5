"""bfloat16 and float16 end to end: T1, T2, P2 and P2 -> T2 (host tier, switches, swap
preemption, and a disk tier) against HF ``transformers`` run in the same dtype, by vLLM's
``check_logprobs_close`` standard: greedy tokens equal, or at the first position where they
differ, each side's token is among the other's top-5 logprobs."""

from __future__ import annotations

import pytest
import torch

from seesaw_mcore.tools.parity import check_logprobs_close, hf_greedy_logprobs
from tests.conftest import launch_job
from tests.distributed.engine_job import MAX_TOKENS, PROMPTS

WORLDS = {1: ["T1"], 2: ["T2", "P2", "P2:T2"]}
DTYPES = ["bfloat16", "float16"]
TOP = 5


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory) -> dict[str, dict]:
    merged: dict[str, dict] = {d: {} for d in DTYPES}
    for world, plans in WORLDS.items():
        out = tmp_path_factory.mktemp("half") / f"w{world}.json"
        extra = ["--disk", str(tmp_path_factory.mktemp("disk"))] if world == 2 else []
        report = launch_job(world, "tests.distributed.halfprec_job", out,
                            [tiny_models["llama"], *plans, *extra])
        for dtype, reps in report.items():
            merged[dtype].update(reps)
    return merged


@pytest.fixture(scope="module")
def references(tiny_models) -> dict[str, list]:
    from transformers import AutoModelForCausalLM

    refs = {}
    for d in DTYPES:
        model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=getattr(torch, d),
                                                     use_safetensors=True)
        refs[d] = hf_greedy_logprobs(model, PROMPTS, MAX_TOKENS, TOP)
    return refs


CASES = [(d, p) for d in DTYPES for p in ["T1", "T2", "P2", "P2:T2", "P2:T2+disk"]]


@pytest.mark.parametrize("dtype,plan", CASES)
def test_close_to_hf_same_dtype(results, references, dtype, plan):
    rep = results[dtype][plan]
    assert rep["kv_dtype"] == f"torch.{dtype}"
    assert all(len(t) == MAX_TOKENS for t in rep["tokens"])
    ours = list(zip(rep["tokens"], rep["logprobs"]))
    check_logprobs_close(ours, references[dtype])
    if plan == "P2:T2":
        assert rep["switches"] >= 3 and rep["preemptions"] > 0
    if plan.endswith("+disk"):  # the disk tier takes what the host tier cannot
        assert rep["switches"] >= 1 and rep["disk_in"] > 0


def test_half_precision_is_mostly_exact(results, references):
    """Closeness is not vacuous: at least half the greedy completions (20 tokens, random
    weights with near-ties) equal HF's token for token in each dtype."""
    for dtype in DTYPES:
        same = sum(r == ref[0] for r, ref in zip(results[dtype]["T1"]["tokens"],
                                                  references[dtype]))
        assert same >= len(PROMPTS) // 2, (dtype, same)


def test_check_rejects_far_tokens():
    ref = [([1, 2, 3], [{1: -0.1}, {2: -0.1, 4: -2.0}, {3: -0.1}])]
    check_logprobs_close([([1, 4, 9], [{1: -0.1}, {4: -0.2, 2: -1.0}, {9: -0.1}])], ref)
    with pytest.raises(AssertionError):
        check_logprobs_close([([1, 7, 3], [{1: -0.1}, {7: -0.2, 2: -1.0}, {3: -0.1}])], ref)
