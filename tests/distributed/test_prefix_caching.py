"""Prefix caching end to end: on an eval-shaped workload (shared few-shot prefix, n=3
samples) the outputs with caching on (and with cascade attention over the shared prefix)
equal those with it off, greedy and seeded, under T1, T2, P2, D2 and P2:T2, on device
caches that preempt and a host tier that switches; the cache computes fewer prompt tokens
and, on the Seesaw plan, stores shared KV once."""

from __future__ import annotations

import pytest

from tests.conftest import launch_worlds

WORLDS = {1: ["T1"], 2: ["T2", "P2", "D2", "P2:T2"]}
PLANS = [p for plans in WORLDS.values() for p in plans]


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory) -> dict[str, dict]:
    return launch_worlds("tests.distributed.prefix_job", WORLDS, tiny_models["llama"],
                         tmp_path_factory, timeout=500)


@pytest.mark.parametrize("plan", PLANS)
def test_outputs_identical_with_caching_on_and_off(results, plan):
    on, off = results[f"{plan} on"], results[f"{plan} off"]
    assert on["greedy"] == off["greedy"]
    assert on["sampled"] == off["sampled"]
    assert any(a != b for s in on["sampled"] for a, b in zip(s, s[1:]))  # distinct draws


@pytest.mark.parametrize("plan", PLANS)
def test_cascade_attention_changes_no_output(results, plan):
    """Cascade attention (thresholds lowered to this job's shared 20-token prefix): the same
    outputs as without caching."""
    on, off = results[f"{plan} cascade"], results[f"{plan} off"]
    assert on["cascade_calls"] > 0  # (rank 0's layers)
    assert on["greedy"] == off["greedy"] and on["sampled"] == off["sampled"]


@pytest.mark.parametrize("plan", PLANS)
def test_caching_computes_less(results, plan):
    on, off = results[f"{plan} on"], results[f"{plan} off"]
    assert off["cached_tokens"] == 0 and on["cached_tokens"] > 0
    computed = on["prefill_tokens"] - on["cached_tokens"]
    assert computed < 0.6 * off["prefill_tokens"], (computed, off["prefill_tokens"])
    assert on["preemptions"] > 0 or plan in ("D2",)  # the small cache preempts


@pytest.mark.parametrize("plan", ["T1", "T2", "P2", "D2"])
def test_static_cache_lasts_across_generate_calls(results, plan):
    """The second call (n=3 samples of the same prompts) finds the first call's blocks:
    sample 0 of the first prompt is already a hit."""
    on = results[f"{plan} on"]
    assert on["first_prompt_hit_second_call"] > 0


def test_seesaw_plan_switches_and_shares_the_host_tier(results):
    on = results["P2:T2 on"]
    assert on["switches"] >= 4 and on["tier_shared_tokens"] > 0
    assert results["P2:T2 off"]["tier_shared_tokens"] == 0
