"""Half-precision job run by tests under the launcher: greedy generation with top-5 logprobs
through ``LLM.generate`` in bfloat16 and float16 for several plans in one process group.

``P2:T2`` runs with a host tier smaller than the prompts and a device cache smaller than the
batch (switches, tier copies and swap preemption, all in half precision), and once more with
a disk tier behind the host tier. Rank 0 writes JSON: ``{dtype: {plan: {"tokens",
"logprobs", "switches", "disk_in"}}}``.
"""

from __future__ import annotations

import argparse
import json

from seesaw_mcore import LLM, SamplingParams
from tests.distributed.engine_job import MAX_TOKENS, PROMPTS
from tests.distributed.seesaw_job import HOST_TOKENS


def run(model: str, plan: str, dtype: str, disk_dir: str | None) -> dict:
    prefill, _, decode = plan.partition(":")
    extra = dict(host_kv_tokens=HOST_TOKENS) if decode else {}
    if disk_dir:
        extra.update(disk_path=disk_dir, disk_kv_tokens=2048)
    llm = LLM(model, prefill=prefill, decode=decode or None, dtype=dtype, num_blocks=12,
              block_size=4, max_num_seqs=8, **extra)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                       logprobs=5), use_tqdm=False)
    stats = llm.engine.stats
    rep = {"tokens": [o.outputs[0].token_ids for o in outs],
           "logprobs": [[{t: lp.logprob for t, lp in e.items()} for e in o.outputs[0].logprobs]
                        for o in outs], "switches": stats.switches,
           "preemptions": stats.preemptions, "disk_in": stats.swap.tiers["disk"].in_bytes,
           "kv_dtype": str(llm.engine.executor.runner.kv_cache[0][0].dtype)}
    llm.close()
    return rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("plans", nargs="+")
    ap.add_argument("--disk", help="also run the first Seesaw plan with a disk tier here")
    args = ap.parse_args()
    report: dict = {}
    for dtype in ("bfloat16", "float16"):
        for plan in args.plans:
            report.setdefault(dtype, {})[plan] = run(args.model, plan, dtype, None)
        seesaw = [p for p in args.plans if ":" in p]
        if args.disk and seesaw:
            report[dtype][seesaw[0] + "+disk"] = run(args.model, seesaw[0], dtype, args.disk)
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)
    from seesaw_mcore.runtime import groups

    groups.shutdown()


if __name__ == "__main__":
    main()
