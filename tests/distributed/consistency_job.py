"""Rollouts a trainer can trust, run by test_consistency.py under the launcher (one launch per
world size): ``logprobs_mode``, routed experts, batch-invariant mode. ``NAME=PATH`` pairs
(``llama``, ``qwen3_moe``, ``mixtral``), the output path, then plans; rank 0 writes JSON
``{plan: {"modes": ..., "routed": ..., "invariant": ...}}``."""

from __future__ import annotations

import json
import random
import sys

from seesaw_mcore import LLM, SamplingParams
from seesaw_mcore.contract import LOGPROBS_MODES
from tests.distributed.engine_job import MAX_TOKENS, PROMPTS

MODE_PLANS = ("T1", "P2:T2")
INVARIANT_PLANS = ("T1", "T2", "P2:T2")
ROUTED_PLANS = ("T1", "T2", "P2:T2", "E2", "E2:T2")
VOCAB = 250  # the tiny llama's: logprobs of every token
# sampled with every kind of processing, and a greedy request
MODE_PARAMS = [
    dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2,
         presence_penalty=0.3, frequency_penalty=0.2, seed=7),
    dict(temperature=1.3, top_p=0.7, seed=8),
    dict(temperature=0),
]


def engine(path: str, plan: str, **kw) -> LLM:
    if ":" in plan:
        kw.setdefault("host_kv_tokens", 256)
    return LLM(path, plan=plan, **kw)


def lp_json(entries) -> list:
    return [None if e is None else [[t, lp.logprob, lp.rank] for t, lp in e.items()]
            for e in entries]


def modes(path: str, plan: str) -> dict:
    """Every mode on the same requests: full-vocabulary logprobs of each sampled token and
    prompt position."""
    out = {}
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:3]]
    for mode in LOGPROBS_MODES:
        llm = engine(path, plan, logprobs_mode=mode, num_blocks=64, block_size=4)
        got = llm.generate(prompts, [SamplingParams(max_tokens=8, ignore_eos=True, logprobs=VOCAB,
                                                    prompt_logprobs=VOCAB, **p)
                                     for p in MODE_PARAMS], use_tqdm=False)
        out[mode] = [{"tokens": o.outputs[0].token_ids, "logprobs": lp_json(o.outputs[0].logprobs),
                      "prompt": lp_json(o.prompt_logprobs)} for o in got]
        llm.close()
    return out


def routed_prompts() -> list[list[list[int]]]:
    """Two runs' prompts: ``PROMPTS``, then each behind a shared 16-token prefix (prefill
    steps of at most 48 tokens: later steps take the prefix from the cache, in a Seesaw
    plan's prefill phase too)."""
    return [PROMPTS, [[2, 4, 6, 8] * 4 + p for p in PROMPTS]]


def routed(models: dict[str, str], plan: str) -> dict:
    """Greedy completions with their routed experts, twice (prefix-cache hits)."""
    out = {}
    for name in ("qwen3_moe", "mixtral"):
        llm = engine(models[name], plan, dtype="float32", num_blocks=96, block_size=4,
                     max_num_batched_tokens=48, enable_prefix_caching=True,
                     enable_return_routed_experts=True)
        runs = []
        for prompts in routed_prompts():
            got = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                              ignore_eos=True), use_tqdm=False)
            runs.append([{"tokens": o.outputs[0].token_ids, "cached": o.num_cached_tokens,
                          "routed": o.outputs[0].routed_experts.tolist(),
                          "dtype": str(o.outputs[0].routed_experts.dtype)} for o in got])
        out[name] = runs
        llm.close()
    return out


def invariant(path: str, plan: str, dtype: str) -> dict:
    """One request alone, in a batch of 64 others, after its prefix was cached (its prompt
    computed in two steps), sampled and greedy."""
    rnd = random.Random(3)
    target = [rnd.randrange(3, VOCAB) for _ in range(40)]
    others = [[rnd.randrange(3, VOCAB) for _ in range(rnd.randrange(5, 40))] for _ in range(64)]
    # prefill steps of <= 80 tokens: the target shares its prefill step with others, and
    # the hit case prefills its first 33 tokens two steps earlier in the same call (a Seesaw
    # plan's prefix cache lasts a prefill phase)
    llm = engine(path, plan, dtype=dtype, batch_invariant=True, enable_prefix_caching=True,
                 num_blocks=512, block_size=16, max_num_batched_tokens=80)
    cases = {}
    for kind, sp in (("greedy", dict(temperature=0)), ("sampled", dict(temperature=1.0, seed=5))):
        params = SamplingParams(max_tokens=10, ignore_eos=True, logprobs=2, **sp)
        alone = llm.generate([{"prompt_token_ids": target}], params, use_tqdm=False)
        llm.reset_prefix_cache()
        batch = llm.generate([{"prompt_token_ids": p} for p in others[:30]]
                             + [{"prompt_token_ids": target}]
                             + [{"prompt_token_ids": p} for p in others[30:]],
                             params, use_tqdm=False)[30:31]
        llm.reset_prefix_cache()
        hit = llm.generate([{"prompt_token_ids": target[:33]}, {"prompt_token_ids": [5] * 60},
                            {"prompt_token_ids": target}], params, use_tqdm=False)[2:]
        llm.reset_prefix_cache()
        if llm.is_driver:
            cases[kind] = {name: {"tokens": o[0].outputs[0].token_ids,
                                  "cached": o[0].num_cached_tokens,
                                  "logprobs": lp_json(o[0].outputs[0].logprobs)}
                           for name, o in (("alone", alone), ("batch", batch), ("hit", hit))}
    llm.close()
    return cases


def main() -> None:
    models = dict(a.split("=", 1) for a in sys.argv[1].split(","))
    out_path, plans = sys.argv[2], sys.argv[3:]
    report: dict = {}
    for plan in plans:
        rep = report.setdefault(plan, {})
        if plan in MODE_PLANS:
            rep["modes"] = modes(models["llama"], plan)
        if plan in ROUTED_PLANS:
            rep["routed"] = routed(models, plan)
        if plan in INVARIANT_PLANS:
            rep["invariant"] = {dt: invariant(models["llama"], plan, dt)
                                for dt in ("float32", "bfloat16")}
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
