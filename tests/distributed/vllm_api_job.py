"""vLLM-API job run by tests under the launcher: prompt logprobs (with and without
preemption), penalties, min_tokens, per plan; rank 0 writes JSON."""

from __future__ import annotations

import json
import sys

from seesaw_mcore import LLM, SamplingParams
from seesaw_mcore.io.writer import logprobs_json

PROMPTS = [[1, 5, 9, 33, 7], [1, 44, 2, 8, 100, 3, 3, 9, 12, 17, 4], [1, 200, 17],
           [9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8, 7, 6]]
MAX_TOKENS = 12
PENALTIES = dict(repetition_penalty=1.6, presence_penalty=0.7, frequency_penalty=0.9)


def run(model: str, plan: str, num_blocks: int) -> dict:
    llm = LLM(model, plan=plan, num_blocks=num_blocks, block_size=4, max_num_seqs=8,
              host_kv_tokens=None if ":" not in plan else 4096)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                ignore_eos=True, prompt_logprobs=3),
                        use_tqdm=False)
    pen = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                               ignore_eos=True, **PENALTIES), use_tqdm=False)
    free = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                ignore_eos=True), use_tqdm=False)
    # min_tokens: the greedy first token is a stop token; it cannot end the first 5 tokens
    stops = [o.outputs[0].token_ids[0] for o in free] if llm.is_driver else []
    mins = llm.generate(prompts, [SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                 min_tokens=5, stop_token_ids=[s])
                                  for s in (stops or [0] * len(PROMPTS))], use_tqdm=False)
    rep = {}
    if llm.is_driver:
        rep = {"prompt_logprobs": [logprobs_json(o.prompt_logprobs) for o in outs],
               "preemptions": llm.engine.stats.preemptions,
               "penalized": [o.outputs[0].token_ids for o in pen],
               "greedy": [o.outputs[0].token_ids for o in free], "stops": stops,
               "min_tokens": [o.outputs[0].token_ids for o in mins],
               "min_tokens_reasons": [o.outputs[0].stop_reason for o in mins]}
    llm.close()
    return rep


def main() -> None:
    model, out_path, plans = sys.argv[1], sys.argv[2], sys.argv[3:]
    report = {}
    for plan in plans:
        report[plan] = run(model, plan, 64)
        report[plan + "+preempt"] = run(model, plan, 10)  # decode recomputes prompts
    if report.get(plans[0]):
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
