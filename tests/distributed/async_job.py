"""AsyncLLM job run by tests under the launcher, per plan: requests arriving at staggered
times against one batch through ``LLM.generate``; aborts in every state with the engine's
block and tier-slot counts after; pause modes with a weight update in between. Rank 0 writes
JSON. Arguments: ``name=path`` of each model, the output file, then ``PLAN@model`` cases."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from safetensors.torch import load_file

from seesaw_mcore import LLM, AsyncLLM, RequestOutputKind, SamplingParams

PROMPTS = [[1, 5, 9, 33, 7], [1, 44, 2, 8, 100, 3, 3, 9, 12, 17, 4], [1, 200, 17],
           [9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8, 7, 6], [3, 3, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9],
           [50, 60], [7, 100, 7, 100, 7, 100, 7]]
MAX_TOKENS = 10
STEP_S = 0.01  # each step made this much slower, so aborts and pauses land mid-run
ENGINE = dict(num_blocks=48, block_size=4, max_num_seqs=4, max_prefill_tokens=24)


def params(i: int, kind=RequestOutputKind.FINAL_ONLY, max_tokens: int = MAX_TOKENS
           ) -> SamplingParams:
    """Even prompts greedy, odd ones seeded top-p sampling."""
    if i % 2 == 0:
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                              output_kind=kind)
    return SamplingParams(temperature=0.9, top_p=0.9, seed=100 + i, max_tokens=max_tokens,
                          ignore_eos=True, output_kind=kind)


def engine_kwargs(plan: str) -> dict:
    return dict(ENGINE, plan=plan, host_kv_tokens=96 if ":" in plan else None)


async def collect(llm, prompt, sp, rid, delay=0.0):
    await asyncio.sleep(delay)
    return [o async for o in llm.generate({"prompt_token_ids": prompt}, sp, rid)]


def tokens_of(outs, kind) -> list[int]:
    """A request's tokens from its stream (deltas concatenated)."""
    if kind == RequestOutputKind.DELTA:
        return [t for o in outs for t in o.outputs[0].token_ids]
    return outs[-1].outputs[0].token_ids


def state(llm) -> dict:
    """The engine's bookkeeping on its thread: sequences, free blocks, tier slots used."""
    eng = llm.engine
    sched = eng.scheduler
    pools = ([r.pool for r in sched.replicas] if hasattr(sched, "replicas")
             else sched.prefill_pools + sched.decode_pools)
    tiers = getattr(sched, "tiers", {})
    return {"seqs": len(eng._seqs), "free": [p.num_free for p in pools],
            "blocks": [p.num_blocks for p in pools],
            "tier_used": sum(t.used for t in tiers.values()) - sum(
                r.length for r in getattr(sched.book, "dead", [])) if tiers else 0,
            "waiting": sched.num_waiting, "has_work": sched.has_work()}


async def staggered(llm) -> dict:
    kinds = [RequestOutputKind(i % 3) for i in range(len(PROMPTS))]
    runs = await asyncio.gather(*[
        collect(llm, p, params(i, kinds[i]), f"s{i}", delay=0.02 * i)
        for i, p in enumerate(PROMPTS)])
    return {"tokens": [tokens_of(r, k) for r, k in zip(runs, kinds)],
            "outputs_per_request": [len(r) for r in runs],
            "finished_last": [r[-1].finished and not any(o.finished for o in r[:-1])
                              for r in runs]}


async def aborts(llm) -> dict:
    """Long requests aborted in every state: queued (more than max_num_seqs), right after
    their first token, mid-decode; the rest of the batch finishes; the counts return."""
    long_sp = [params(i, RequestOutputKind.DELTA, max_tokens=60) for i in range(len(PROMPTS))]
    await llm.pause_generation(mode="keep")  # all queued while paused: none admitted
    tasks = [asyncio.create_task(collect(llm, p, long_sp[i], f"a{i}"))
             for i, p in enumerate(PROMPTS)]
    while llm.num_requests < len(PROMPTS):  # all submitted
        await asyncio.sleep(0.001)
    await llm.abort(["a7", "a6"])  # queued: never admitted
    await llm.resume_generation()
    while not await llm._call(lambda: any(s.output_token_ids for s in llm.engine._seqs.values())):
        await asyncio.sleep(0.005)
    await llm.abort("a0")  # its first tokens out
    await asyncio.sleep(0.15)
    await llm.abort(["a1", "a2", "a3", "missing"])  # mid-decode (or in a tier)
    runs = await asyncio.gather(*tasks)
    for _ in range(200):  # the loop goes idle
        st = await llm._call(lambda: state(llm))
        if not st["has_work"]:
            break
        await asyncio.sleep(0.02)
    # one more request (in a Seesaw plan: switches free the tiers' dead slots)
    after = await collect(llm, PROMPTS[0], params(0), "after")
    st = await llm._call(lambda: state(llm))
    return {"reasons": [r[-1].outputs[0].finish_reason for r in runs],
            "lengths": [sum(len(o.outputs[0].token_ids) for o in r) for r in runs],
            "state": st, "after": after[-1].outputs[0].token_ids}


async def pauses(llm, weights_b) -> dict:
    res: dict = {}
    # abort: in-flight requests end now; one sent while paused waits for resume
    t = asyncio.create_task(collect(llm, PROMPTS[1], params(0, max_tokens=80), "p1"))
    await asyncio.sleep(0.1)
    await llm.pause_generation(mode="abort")
    res["abort_reason"] = (await t)[-1].outputs[0].finish_reason
    late = asyncio.create_task(collect(llm, PROMPTS[0], params(0), "late"))
    await asyncio.sleep(0.2)
    res["late_waited"] = not late.done()
    await llm.resume_generation()
    res["late"] = (await late)[-1].outputs[0].token_ids
    # wait: the batch in flight finishes, then the pause returns
    t = asyncio.create_task(collect(llm, PROMPTS[2], params(0, max_tokens=30), "w"))
    await asyncio.sleep(0.05)
    await llm.pause_generation(mode="wait")
    res["wait_done_at_pause"] = t.done() and (await t)[-1].outputs[0].finish_reason
    await llm.resume_generation()
    # keep: frozen with its KV, the weights change, it continues with them
    t = asyncio.create_task(collect(llm, PROMPTS[3], params(0, RequestOutputKind.DELTA,
                                                            max_tokens=40), "k"))
    while llm.num_requests == 0 or not await llm._call(
            lambda: any(len(s.output_token_ids) >= 3 for s in llm.engine._seqs.values())):
        await asyncio.sleep(0.01)
    await llm.pause_generation(mode="keep")
    before = await llm._call(lambda: [list(s.output_token_ids)
                                      for s in llm.engine._seqs.values()])
    await llm.update_weights(weights_b.items())
    await llm.resume_generation()
    outs = await t
    res["keep_before"] = before[0]
    res["keep_tokens"] = tokens_of(outs, RequestOutputKind.DELTA)
    res["keep_reason"] = outs[-1].outputs[0].finish_reason
    res["new_weights"] = (await collect(llm, PROMPTS[0], params(0), "b"))[-1].outputs[0].token_ids
    return res


def run(path: str, plan: str, weights_b: dict | None) -> dict:
    os.environ["SEESAW_FAULT_SLOW"] = f"{plan}={STEP_S}"  # every step: requests catch it
    llm = AsyncLLM(path, **engine_kwargs(plan))  # other ranks: follow until rank 0 closes
    rep: dict = {}
    if llm.is_driver:
        async def main():
            out = {"staggered": await staggered(llm), "aborts": await aborts(llm)}
            if weights_b is not None:
                out["pauses"] = await pauses(llm, weights_b)
            return out
        rep = asyncio.run(main())
    llm.close()
    del os.environ["SEESAW_FAULT_SLOW"]
    ref = LLM(path, **engine_kwargs(plan))
    outs = ref.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        [params(i) for i in range(len(PROMPTS))], use_tqdm=False,
                        request_ids=[f"s{i}" for i in range(len(PROMPTS))])
    if ref.is_driver:
        rep["batch"] = [o.outputs[0].token_ids for o in outs]
    ref.close()
    return rep


def main() -> None:
    models = dict(kv.split("=", 1) for kv in sys.argv[1].split(","))
    out_path, cases = sys.argv[2], sys.argv[3:]
    report = {}
    for case in cases:
        plan, name = case.split("@")
        b = load_file(f"{models['llama_b']}/model.safetensors") if name == "llama" else None
        report[case] = run(models[name], plan, b)
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
