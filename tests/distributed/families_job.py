"""Model-family job run by test_model_families.py under the launcher: for each model and
plan, greedy tokens in float32 and, for some plans, greedy tokens with top-5 logprobs in
bfloat16, through ``LLM.generate``. ``MODEL=PATH`` pairs, then plans; rank 0 writes JSON
``{plan: {model: {"float32": {"tokens", "switches"}, "bfloat16": {"tokens", "logprobs"}}}}``."""

from __future__ import annotations

import json
import sys

from seesaw_mcore import LLM, SamplingParams
from tests.distributed.engine_job import MAX_TOKENS, PROMPTS

# bf16 closeness: one static plan; a Seesaw plan for one MoE family (Qwen3-MoE: see the test)
HALF_PLANS = {"qwen3": ("T1",), "mistral": ("T1",), "mixtral": ("T1", "P2:T2")}
WINDOW_PLANS = {"mistral": ("T1", "P2:T2")}  # the window is the same under every layout
MOE = ("qwen3_moe", "mixtral")
MODEL_KW = {"mistral": {"max_model_len": 64}}  # its sliding window: every sequence fits


def run(path: str, plan: str, dtype: str, logprobs: int | None, **kw) -> dict:
    if ":" in plan:
        kw["host_kv_tokens"] = 48  # small: several switches per call
    llm = LLM(path, plan=plan, dtype=dtype, num_blocks=48, block_size=4, **kw)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                       logprobs=logprobs), use_tqdm=False)
    rep = {"tokens": [o.outputs[0].token_ids for o in outs],
           "switches": llm.engine.stats.switches}
    if logprobs:
        rep["logprobs"] = [[{t: lp.logprob for t, lp in e.items()} for e in o.outputs[0].logprobs]
                           for o in outs]
    llm.close()
    return rep


def main() -> None:
    models = dict(a.split("=", 1) for a in sys.argv[1].split(","))
    out, plans = sys.argv[2], sys.argv[3:]
    report: dict = {}
    for name, path in models.items():
        for plan in plans:
            if "E" in plan and name not in MOE:
                continue  # expert parallel: mixture-of-experts models only
            if name in WINDOW_PLANS and plan not in WINDOW_PLANS[name]:
                continue
            kw = MODEL_KW.get(name, {})
            rep = {"float32": run(path, plan, "float32", None, **kw)}
            if plan in HALF_PLANS.get(name, ()):
                rep["bfloat16"] = run(path, plan, "bfloat16", 5, **kw)
            report.setdefault(plan, {})[name] = rep
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
