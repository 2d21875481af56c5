"""AsyncLLM under T1, T2, P2, D2, E2 (MoE) and P2 -> T2 (``async_job.py``): requests that
arrive at staggered times give the tokens (greedy, and seeded samples) of one batch through
``LLM.generate``; aborts in every state end those requests with what they had and leave no
block or tier slot held; pause modes abort / wait / keep, with a weight update while kept.
Single-rank behaviour of the front-end (bad requests, dropped callers, output kinds, sleep,
many requests aborted at random) is tested in-process."""

from __future__ import annotations

import asyncio

import pytest

from seesaw_mcore import RequestOutputKind, SamplingParams
from tests.conftest import launch_job
from tests.distributed.async_job import MAX_TOKENS, PROMPTS

CASES = {1: ["T1@llama"], 2: ["T2@llama", "P2@llama", "D2@llama", "P2:T2@llama",
                              "E2@qwen3_moe"]}
ALL = [c for cs in CASES.values() for c in cs]


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory) -> dict:
    models = ",".join(f"{n}={tiny_models[n]}" for n in ("llama", "llama_b", "qwen3_moe"))
    out: dict = {}
    for world, cases in CASES.items():
        path = tmp_path_factory.mktemp("async") / f"w{world}.json"
        out.update(launch_job(world, "tests.distributed.async_job", path, [models, *cases],
                              timeout=600))
    return out


@pytest.mark.parametrize("case", ALL)
def test_staggered_requests_match_one_batch(results, case):
    r = results[case]
    assert r["staggered"]["tokens"] == r["batch"]  # greedy and seeded top-p alike
    per = r["staggered"]["outputs_per_request"]
    # cumulative and delta stream every token; final-only sends one output
    assert [per[i] for i in range(len(PROMPTS)) if i % 3 == 2] == [1] * 2
    assert all(n == MAX_TOKENS for i, n in enumerate(per) if i % 3 != 2)
    assert all(r["staggered"]["finished_last"])


@pytest.mark.parametrize("case", ALL)
def test_aborts_in_every_state_free_everything(results, case):
    a = results[case]["aborts"]
    assert a["reasons"][6:] == ["abort", "abort"] and a["lengths"][6:] == [0, 0]  # queued
    assert a["reasons"][0] == "abort" and 0 < a["lengths"][0] < 60  # after its first tokens
    assert all(r in ("abort", "length") for r in a["reasons"])
    assert "abort" in a["reasons"][1:4]
    st = a["state"]
    assert st["seqs"] == 0 and not st["has_work"] and st["waiting"] == 0
    assert st["free"] == st["blocks"]  # every device block back (cached ones count free)
    assert st["tier_used"] == 0  # and every tier slot
    assert a["after"] == results[case]["batch"][0]  # the engine goes on as before


@pytest.mark.parametrize("case", [c for c in ALL if c.endswith("@llama")])
def test_pause_modes_and_a_weight_update_while_kept(results, tiny_models, case):
    p = results[case]["pauses"]
    assert p["abort_reason"] == "abort"
    assert p["late_waited"] and p["late"] == results[case]["batch"][0]
    assert p["wait_done_at_pause"] == "length"  # pause(wait) returned after it finished
    # keep: frozen with its KV, finished after resume, its later tokens from new weights
    assert p["keep_reason"] == "length" and len(p["keep_tokens"]) == 40
    k = len(p["keep_before"])
    assert k >= 3 and p["keep_tokens"][:k] == p["keep_before"]
    from tests.conftest import hf_greedy

    old = hf_greedy(tiny_models["llama"], [PROMPTS[3]], 40)[0]
    assert p["keep_before"] == old[:k]  # before the pause: the old weights' greedy tokens
    assert p["keep_tokens"][k:] != old[k:]  # after: not the old weights' continuation
    assert p["new_weights"] == hf_greedy(tiny_models["llama_b"], [PROMPTS[0]], MAX_TOKENS)[0]


# -- one rank, in this process ---------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_models):
    """A one-rank AsyncLLM in this process; its process group and the rank variables it
    sets are gone afterwards (jobs this worker launches later must not inherit them)."""
    import os

    from seesaw_mcore import AsyncLLM

    saved = dict(os.environ)
    llm = AsyncLLM(tiny_models["llama"], num_blocks=64, block_size=4, max_num_seqs=8)
    try:
        yield llm
    finally:
        llm.shutdown()
        os.environ.clear()
        os.environ.update(saved)


def _run(coro):
    return asyncio.run(coro)


async def _tokens(llm, prompt, sp, rid=None):
    return [o async for o in llm.generate(prompt, sp, rid)]


def test_a_bad_request_fails_alone(engine):
    async def main():
        good = asyncio.create_task(_tokens(engine, {"prompt_token_ids": [1, 2, 3]},
                                           SamplingParams(temperature=0, max_tokens=20,
                                                          ignore_eos=True), "good"))
        while engine.num_requests == 0:
            await asyncio.sleep(0.001)
        errors = []
        for prompt, sp, rid in (({"prompt_token_ids": [1, 10**6]}, None, "big"),
                                ({"prompt_token_ids": [1] * 500}, None, "long"),
                                ({"prompt_token_ids": [1, 2]}, "x", "type"),
                                ({"prompt_token_ids": [1, 2]}, None, "good")):
            try:
                await _tokens(engine, prompt, sp, rid)
            except Exception as e:  # noqa: BLE001
                errors.append(str(e))
        return errors, await good

    errors, good = _run(main())
    assert errors[0] == "request 'big': token id 1000000 is outside the vocabulary [0, 250)"
    assert errors[1] == ("request 'long' needs up to 512 tokens of KV cache (prompt 500 + "
                         "max_tokens 12) but the cache holds 256; raise cache.num_blocks / "
                         "cache.kv_cache_gib or lower max_tokens")
    assert errors[2] == "sampling_params must be a SamplingParams, got str"
    assert errors[3] == "request id 'good' is already in flight"
    assert good[-1].finished and len(good[-1].outputs[0].token_ids) == 20


def test_a_dropped_caller_aborts_its_request(engine):
    async def main():
        sp = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
        agen = engine.generate({"prompt_token_ids": [1, 2, 3]}, sp, "dropped")
        first = await agen.__anext__()
        await agen.aclose()  # the caller goes away mid-stream
        for _ in range(200):
            if engine.num_requests == 0:
                break
            await asyncio.sleep(0.01)
        return first, engine.num_requests, await engine._call(
            lambda: (len(engine.engine._seqs), engine.engine.scheduler.replicas[0].pool.num_free))

    first, left, (seqs, free) = _run(main())
    assert len(first.outputs[0].token_ids) >= 1 and not first.finished
    assert left == 0 and seqs == 0 and free == 64


def test_output_kinds_add_up(engine):
    sp = dict(temperature=0.8, seed=7, max_tokens=12, ignore_eos=True, n=2,
              logprobs=2)

    async def main():
        return [await _tokens(engine, {"prompt_token_ids": [1, 9, 8]},
                              SamplingParams(output_kind=k, **sp), f"kind{int(k)}")
                for k in RequestOutputKind]

    cum, delta, final = _run(main())
    assert len(final) == 1 and final[0].finished
    for k in range(2):
        whole = final[0].outputs[k]
        assert cum[-1].outputs[k].token_ids == whole.token_ids
        assert [t for o in delta for t in o.outputs[k].token_ids] == whole.token_ids
        assert [lp for o in delta for lp in o.outputs[k].logprobs] == whole.logprobs
        grown = [len(o.outputs[k].token_ids) for o in cum]
        assert grown == sorted(grown) and grown[-1] == 12


def test_sleep_and_wake_up_while_requests_run(engine):
    async def main():
        sp = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        ref = await _tokens(engine, {"prompt_token_ids": [1, 4, 4]}, sp, "ref")
        t = asyncio.create_task(_tokens(engine, {"prompt_token_ids": [1, 4, 4]}, sp, "sl"))
        while engine.num_requests == 0:
            await asyncio.sleep(0.001)
        await engine.sleep(1)
        asleep = await engine.is_sleeping()
        await engine.wake_up()
        out = await t
        return ref[-1].outputs[0].token_ids, out[-1].outputs[0].token_ids, asleep

    ref, out, asleep = _run(main())
    assert asleep and out == ref  # recomputed after the wake-up: the same tokens


def test_many_requests_aborted_at_random_leave_nothing_behind(engine):
    """10,000 requests arriving over time, a third aborted at random points: every block
    is free afterwards and the engine's memory does not grow."""
    import random

    import psutil

    rng = random.Random(0)

    async def one(i):
        sp = SamplingParams(temperature=0, max_tokens=rng.randint(1, 6), ignore_eos=True)
        agen = engine.generate({"prompt_token_ids": [1 + i % 200, 2, 3]}, sp, f"m{i}")
        async for _ in agen:
            if rng.random() < 0.3:
                await engine.abort(f"m{i}")

    async def wave(n0):
        await asyncio.gather(*[one(i) for i in range(n0, n0 + 500)])

    async def main():
        rss = []
        for w in range(20):
            await wave(500 * w)
            rss.append(psutil.Process().memory_info().rss)
        st = await engine._call(lambda: (len(engine.engine._seqs),
                                         engine.engine.scheduler.replicas[0].pool.num_free,
                                         len(engine._streams), engine._loop.num_requests))
        return rss, st

    rss, (seqs, free, streams, live) = _run(main())
    assert (seqs, free, streams, live) == (0, 64, 0, 0)
    assert rss[-1] - rss[4] < 20 * 2**20, [r // 2**20 for r in rss]


def test_weights_from_a_trainer_process_while_serving(tiny_models, tmp_path):
    """Under T2 and P2:T2, every rank joins a trainer's update group and receives its
    checkpoint through the engine's control messages while a request is kept: the request
    finishes and a new one generates what HF generates on the new weights."""
    from tests.conftest import hf_greedy

    models = f"A={tiny_models['llama']},B={tiny_models['llama_b']}"
    res = launch_job(2, "tests.distributed.async_trainer_job", tmp_path / "t.json",
                     [models, "T2", "P2:T2"], timeout=400)
    want = hf_greedy(tiny_models["llama_b"], [PROMPTS[0]], 24)[0]
    for plan in ("T2", "P2:T2"):
        r = res[plan]
        assert r["trainer_exit"] == 0 and r["kept_reason"] == "length"
        assert r["kept_tokens"] == 24 and r["new"] == want, (plan, r)
