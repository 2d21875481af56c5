"""``LLM.update_weights``: an engine built on checkpoint A, given checkpoint B's full tensors,
generates what HF generates on B, under T1, T2, P2, D2 and P2:T2 (the Seesaw plan after
several switches: both layouts' shards were written); partial updates compose; a bad name,
shape or dtype is a one-line error and changes nothing; the same update from a separate
trainer process over a weight-update group."""

from __future__ import annotations

import pytest

from tests.conftest import hf_greedy, launch_worlds
from tests.distributed.engine_job import MAX_TOKENS, PROMPTS

WORLDS = {1: ["T1"], 2: ["T2", "P2", "D2", "P2:T2"]}
PLANS = [p for plans in WORLDS.values() for p in plans]


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory) -> dict:
    models = f"{tiny_models['llama']},{tiny_models['llama_b']}"
    return launch_worlds("tests.distributed.weights_job", WORLDS, models, tmp_path_factory,
                         timeout=500)


@pytest.fixture(scope="module")
def hf(tiny_models) -> dict[str, list[list[int]]]:
    return {k: hf_greedy(tiny_models[k], PROMPTS, MAX_TOKENS) for k in ("llama", "llama_b")}


@pytest.mark.parametrize("plan", PLANS)
def test_updated_engine_generates_what_hf_generates_on_the_new_weights(results, hf, plan):
    r = results[plan]
    assert r["before"] == hf["llama"] and r["after"] == hf["llama_b"]
    assert r["after"] != r["before"]
    assert r["back_to_a"] == hf["llama"] and r["halves"] == hf["llama_b"]
    if plan == "P2:T2":
        assert r["switches"] >= 4  # the new weights came back through switches


@pytest.mark.parametrize("plan", ["T1", "P2:T2"])
def test_update_from_a_trainer_process_equals_the_in_process_one(results, hf, plan):
    """A separate trainer process broadcasts B's tensors over a group made for it
    (``init_weight_update_group`` + ``update_weights_from_distributed``)."""
    assert results[plan]["distributed"] == results[plan]["after"] == hf["llama_b"]


@pytest.mark.parametrize("plan", PLANS)
def test_bad_updates_are_refused_whole(results, hf, plan):
    r = results[plan]
    assert r["errors"] == [
        "update_weights: 'nope.weight' is not a parameter of this model",
        "update_weights: model.embed_tokens.weight has shape [1, 64] but the model's is "
        "[250, 64] (full, unsharded tensors)",
        "update_weights: model.norm.weight must be a floating-point tensor, got torch.int64",
    ]
    assert r["after_refused"] == hf["llama_b"]  # the valid first pair was not written either
