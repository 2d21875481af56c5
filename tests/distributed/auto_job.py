"""``plan=auto`` job run by tests under the launcher (2 ranks): the measured trial on a fixed
profile (so the candidates are the same on every machine), with candidates made artificially
slow, a job shorter than the trial, a trial spanning two ``generate`` calls, and
``auto_trial=False``; rank 0 writes JSON.

    python -m tests.distributed.auto_job MODEL OUT CACHE_DIR
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict


def _requests(n: int, seed: int):
    import random

    from seesaw_mcore import SamplingParams

    rng = random.Random(seed)
    prompts = [{"prompt_token_ids": [rng.randrange(3, 250) for _ in range(rng.randint(4, 24))]}
               for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(6, 40), ignore_eos=True)
              for _ in range(n)]
    return prompts, params


def _outputs(outs) -> list:
    return [[o.request_id, [c.token_ids for c in o.outputs]] for o in outs]


def main() -> None:
    model, out_path, cache = sys.argv[1:4]
    os.environ["SEESAW_CACHE_DIR"] = cache
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from seesaw_mcore import LLM
    from seesaw_mcore.planner import Hardware
    from seesaw_mcore.planner.profile import cache_file
    from seesaw_mcore.runtime import groups

    rank, world = groups.init_distributed()
    if rank == 0:  # a fixed profile: every candidate is valid and their order is known
        os.makedirs(cache, exist_ok=True)
        hw = Hardware("fixed (test)", mem_gib=4, mem_gbs=20, tflops=0.1, allreduce_gbs=10,
                      p2p_gbs=5, host_link_gbs=10, host_gib=4, dtype_bytes=4,
                      allreduce_latency_s=5e-5, p2p_latency_s=5e-5, step_s=1e-3,
                      tp_step_s=5e-4, layer_s=3e-4, microbatch_s=2e-4, switch_s=5e-4,
                      switch_copies_weights=False)
        with open(cache_file(world), "w") as f:
            json.dump(asdict(hw), f)
    import torch.distributed as dist

    dist.barrier()
    report: dict = {}
    kw = dict(num_blocks=64, block_size=4, auto_trial_seqs=8, auto_trial_steps=6,
              workload="14:23")  # the requests' mean lengths

    # 1. the trial on 40 requests; the model's favourite and the first-run candidate slowed
    prompts, params = _requests(40, 0)
    llm = LLM(model, plan="auto", **kw)
    order = [c.plan.to_string() for c in llm.trial.candidates]  # run order: favourite last
    # slowdowns far above the plans' own step-time spread, also on a busy machine
    os.environ["SEESAW_FAULT_SLOW"] = f"{order[-1]}=0.25,{order[0]}=0.08"
    outs = llm.generate(prompts, params, use_tqdm=False)
    os.environ.pop("SEESAW_FAULT_SLOW")
    if rank == 0:
        report["slowed"] = {"order": order, "summary": llm.trial.summary(),
                            "plan": llm.plan.to_string(),
                            "engine_plan": llm.engine.plan.to_string(),
                            "outputs": _outputs(outs)}
    llm.close()
    ref = LLM(model, plan="T2", **kw)
    outs = ref.generate(prompts, params, use_tqdm=False)
    if rank == 0:
        report["reference"] = _outputs(outs)
    ref.close()

    # 2. a job shorter than the trial: it ends inside the trial, nothing is lost
    from seesaw_mcore import SamplingParams

    short_p, _ = _requests(3, 1)  # fewer decode steps than one candidate's window
    short_s = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(model, plan="auto", **kw)
    outs = llm.generate(short_p, short_s, use_tqdm=False)
    if rank == 0:
        report["short"] = {"outputs": _outputs(outs), "summary": llm.trial.summary()}
    # 3. the same engine's next call: the trial goes on where it was
    outs = llm.generate(prompts, params, use_tqdm=False)
    if rank == 0:
        report["second_call"] = {"outputs": _outputs(outs), "summary": llm.trial.summary()}
    llm.close()

    # 4. no trial: the model's pick, untried
    llm = LLM(model, plan="auto", auto_trial=False, **kw)
    outs = llm.generate(prompts[:4], params[:4], use_tqdm=False)
    if rank == 0:
        report["no_trial"] = {"plan": llm.plan.to_string(), "trial": llm.trial is not None,
                              "favourite": order[-1], "outputs": _outputs(outs)}
        with open(out_path, "w") as f:
            json.dump(report, f)
    llm.shutdown()


if __name__ == "__main__":
    main()
