"""Engine job run by tests under the launcher: greedy and seeded sampling through
``LLM.generate`` for several layouts in one process group; rank 0 writes JSON."""

from __future__ import annotations

import json
import sys

from seesaw_mcore import LLM, SamplingParams
from seesaw_mcore.io.writer import logprobs_json

# Mixed lengths; with 12 blocks of 4 tokens the cache holds 48 tokens, far less than the
# batch needs (~150), so decode must preempt and recompute.
PROMPTS = [[1, 5, 9, 33, 7], [1, 44, 2, 8, 100, 3, 3, 9, 12, 17, 4], [1, 200], [3] * 20,
           [9, 8, 7, 6, 5, 4, 3], [11] * 13]
MAX_TOKENS = 20


def main() -> None:
    model, out_path, layouts = sys.argv[1], sys.argv[2], sys.argv[3:]
    report = {}
    for layout in layouts:
        llm = LLM(model, prefill=layout, num_blocks=12, block_size=4, max_num_seqs=8)
        prompts = [{"prompt_token_ids": p} for p in PROMPTS]
        greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                      ignore_eos=True), use_tqdm=False)
        params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=100 + i,
                                 max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=2, n=2)
                  for i in range(len(PROMPTS))]
        sampled = llm.generate(prompts, params, use_tqdm=False)
        if llm.is_driver:
            report[layout] = {
                "greedy": [o.outputs[0].token_ids for o in greedy],
                "preemptions": sum(o.outputs[0].num_preemptions for o in greedy),
                "sampled": [[c.token_ids for c in o.outputs] for o in sampled],
                "logprobs": [logprobs_json(o.outputs[0].logprobs) for o in sampled],
                "cumulative": [o.outputs[0].cumulative_logprob for o in sampled],
            }
    if report:
        with open(out_path, "w") as f:
            json.dump(report, f)
    llm.shutdown()


if __name__ == "__main__":
    main()
