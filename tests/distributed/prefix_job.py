"""Prefix-caching job run by test_prefix_caching.py under the launcher: an eval-shaped
workload (one few-shot prefix, questions of varied length, n samples) greedy and seeded,
with prefix caching on and off, per plan, on device caches small enough to preempt (and
for Seesaw plans a host tier small enough to switch many times). Rank 0 writes JSON."""

from __future__ import annotations

import json
import random
import sys

from seesaw_mcore import LLM, SamplingParams

_rng = random.Random(11)
SHOT = [1] + [_rng.randrange(4, 250) for _ in range(21)]  # 22 tokens: 5 full blocks of 4
PROMPTS = [SHOT + [_rng.randrange(4, 250) for _ in range(_rng.randint(1, 9))]
           for _ in range(6)]
MAX_TOKENS = 10
N = 3


def run(model: str, plan: str, caching: bool, cascade_tokens: int | None = None) -> dict:
    from seesaw_mcore.model import attention, cascade

    saved = cascade.MIN_SEQS, cascade.MIN_TOKENS, attention.cascade_attention_cpu
    calls = [0]
    if cascade_tokens is not None:  # cascade attention over this job's 20-token prefix
        cascade.MIN_SEQS, cascade.MIN_TOKENS = 2, cascade_tokens

        def counted(*args):
            calls[0] += 1
            return saved[2](*args)

        attention.cascade_attention_cpu = counted
    kw = {"host_kv_tokens": 96} if ":" in plan else {}
    llm = LLM(model, plan=plan, num_blocks=24, block_size=4, max_num_seqs=8,
              enable_prefix_caching=caching, **kw)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                  ignore_eos=True), use_tqdm=False)
    params = [SamplingParams(n=N, temperature=0.8, top_p=0.9, seed=7 + i,
                             max_tokens=MAX_TOKENS, ignore_eos=True)
              for i in range(len(PROMPTS))]
    cached_first = llm.engine.stats.cached_tokens
    sampled = llm.generate(prompts, params, use_tqdm=False)  # a static plan's cache persists
    st = llm.engine.stats
    report = {"greedy": [o.outputs[0].token_ids for o in greedy],
              "sampled": [[c.token_ids for c in o.outputs] for o in sampled],
              "prefill_tokens": st.prefill_tokens, "cached_tokens": st.cached_tokens,
              "tier_shared_tokens": st.tier_shared_tokens, "preemptions": st.preemptions,
              "switches": st.switches, "cached_first_call": cached_first,
              "first_prompt_hit_second_call": sampled[0].num_cached_tokens if sampled else 0,
              "num_cached_tokens": [o.num_cached_tokens for o in sampled]}
    llm.close()
    cascade.MIN_SEQS, cascade.MIN_TOKENS, attention.cascade_attention_cpu = saved
    report["cascade_calls"] = calls[0]
    return report


def main() -> None:
    model, out_path, plans = sys.argv[1], sys.argv[2], sys.argv[3:]
    report = {f"{plan} {'on' if c else 'off'}": run(model, plan, c)
              for plan in plans for c in (True, False)}
    report.update({f"{plan} cascade": run(model, plan, True, cascade_tokens=8)
                   for plan in plans})
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)
    from seesaw_mcore.runtime import groups

    groups.shutdown()


if __name__ == "__main__":
    main()
