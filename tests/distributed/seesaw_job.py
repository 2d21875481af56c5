"""Seesaw job run by tests under the launcher: for each plan, greedy and seeded sampling
through ``LLM.generate`` with a host tier far smaller than the prompts (so prefill and
decode alternate several times); optionally a leak check over 50+ switches. Rank 0 writes
JSON."""

from __future__ import annotations

import argparse
import json
import os
import random

import psutil
import torch.distributed as dist

from seesaw_mcore import LLM, SamplingParams
from seesaw_mcore.runtime import groups
from tests.distributed.engine_job import MAX_TOKENS, PROMPTS

# Policy runs: 24 prompts of 6-16 tokens (~260 tokens) through a host tier of 90 token slots
# (about 3 fills) and a device cache of ~4 sequences.
_rng = random.Random(7)
POLICY_PROMPTS = [[1] + [_rng.randrange(4, 250) for _ in range(_rng.randint(5, 15))]
                  for _ in range(24)]
POLICY_MAX_TOKENS = 10
POLICY_HOST_TOKENS = 90

# PROMPTS have 58 tokens; the host tier holds 40 (the longest prompt + max_tokens - 1 = 39
# fits), the device cache 48, so the run switches several times and decode preempts.
HOST_TOKENS = 40


def run_plan(model: str, prefill: str, decode: str | None) -> dict:
    llm = LLM(model, prefill=prefill, decode=decode, num_blocks=12, block_size=4,
              max_num_seqs=8, host_kv_tokens=HOST_TOKENS)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    greedy = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                  ignore_eos=True), use_tqdm=False)
    stats = llm.engine.stats
    switches, preemptions, swapped = stats.switches, stats.preemptions, stats.swap_preemptions
    params = [SamplingParams(temperature=0.9, top_k=40, top_p=0.9, seed=100 + i, n=2,
                             max_tokens=MAX_TOKENS, ignore_eos=True) for i in range(len(PROMPTS))]
    sampled = llm.generate(prompts, params, use_tqdm=False)
    llm.close()
    swap = {}
    if decode:  # a roomy host tier: decode preempts by swapping KV out and back in
        llm = LLM(model, prefill=prefill, decode=decode, num_blocks=12, block_size=4,
                  max_num_seqs=8, host_kv_tokens=400)
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                                    ignore_eos=True), use_tqdm=False)
        swap = {"greedy_swap": [o.outputs[0].token_ids for o in outs],
                "swap_run_preemptions": [llm.engine.stats.preemptions,
                                         llm.engine.stats.swap_preemptions]}
        llm.close()
    return {**swap, "greedy": [o.outputs[0].token_ids for o in greedy], "switches": switches,
            "preemptions": preemptions, "swap_preemptions": swapped,
            "sampled": [[c.token_ids for c in o.outputs] for o in sampled]}


def disk_runs(model: str, prefill: str, decode: str, disk_dir: str) -> dict:
    """Greedy runs with the disk tier behind a host tier too small for the workload: with a
    roomy device cache, with a tiny one (swap preemption into the tiers), and the latter
    with inline (not async) copies. Records rank 0's disk traffic and what ``disk_dir``
    holds while the tier is open."""
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    report = {}
    runs = [("disk", 64, True), ("disk_swap", 12, True), ("disk_sync", 12, False)]
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() == 4:
        runs = runs[:1]  # 4 ranks on the test machine's 2 cores: the roomy run only
    for name, blocks, async_swap in runs:
        llm = LLM(model, prefill=prefill, decode=decode, num_blocks=blocks, block_size=4,
                  max_num_seqs=8, host_kv_tokens=HOST_TOKENS, disk_path=disk_dir,
                  disk_kv_tokens=2048, async_swap=async_swap)
        listed = os.listdir(disk_dir)
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        st = llm.engine.stats
        disk = st.swap.tiers["disk"]
        report[name] = {"greedy": [o.outputs[0].token_ids for o in outs],
                        "listed": listed, "disk_out": disk.out_bytes, "disk_in": disk.in_bytes,
                        "switches": st.switches, "preemptions": st.preemptions,
                        "swap_preemptions": st.swap_preemptions}
        llm.close()
    report["listed_after"] = os.listdir(disk_dir)
    return report


def disk_abort(model: str, prefill: str, decode: str, disk_dir: str) -> dict:
    """An exception in the engine on rank 0 mid-run (the workers are told and raise too):
    what is left in ``disk_dir`` afterwards."""
    llm = LLM(model, prefill=prefill, decode=decode, num_blocks=12, block_size=4,
              max_num_seqs=8, host_kv_tokens=HOST_TOKENS, disk_path=disk_dir,
              disk_kv_tokens=2048)
    steps = [0]
    add_step = llm.engine.stats.add_step

    def failing_add_step(step, seconds):  # rank 0, between steps: every rank is idle
        steps[0] += 1
        if steps[0] == 6:
            raise RuntimeError("injected failure")
        add_step(step, seconds)

    llm.engine.stats.add_step = failing_add_step
    error = None
    try:
        llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                     SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                     use_tqdm=False)
    except Exception as e:  # noqa: BLE001 - the report says what was raised
        error = str(e)
    llm.close()
    return {"error": error, "disk_out": llm.engine.stats.swap.tiers["disk"].out_bytes,
            "listed_after": os.listdir(disk_dir)}


def policy_runs(model: str, prefill: str, decode: str) -> dict:
    """Greedy outputs, switches and hand-backs under each phase-switch policy."""
    report = {}
    for policy in ("transition_minimizing", "prefill_first", "decode_first"):
        llm = LLM(model, prefill=prefill, decode=decode, num_blocks=16, block_size=4,
                  max_num_seqs=8, host_kv_tokens=POLICY_HOST_TOKENS, policy=policy)
        outs = llm.generate([{"prompt_token_ids": p} for p in POLICY_PROMPTS],
                            SamplingParams(temperature=0, max_tokens=POLICY_MAX_TOKENS,
                                           ignore_eos=True), use_tqdm=False)
        st = llm.engine.stats
        report[policy] = {"greedy": [o.outputs[0].token_ids for o in outs],
                          "switches": st.switches, "handed_back": st.handed_back}
        llm.close()
    return report


def stream_run(model: str, prefill: str, decode: str) -> dict:
    """The policy prompts from a generator, outputs only through ``on_output``: how many
    prompts the engine had pulled when the first output came, and every output."""
    llm = LLM(model, prefill=prefill, decode=decode, num_blocks=16, block_size=4,
              max_num_seqs=2, host_kv_tokens=POLICY_HOST_TOKENS)
    pulled, first_at, outs = [0], [None], {}

    def prompts():
        for p in POLICY_PROMPTS:
            pulled[0] += 1
            yield {"prompt_token_ids": p}

    def on_output(o):
        first_at[0] = pulled[0] if first_at[0] is None else first_at[0]
        outs[o.request_id] = o.outputs[0].token_ids

    kept = llm.generate(prompts() if dist.get_rank() == 0 else [],
                        SamplingParams(temperature=0, max_tokens=POLICY_MAX_TOKENS,
                                       ignore_eos=True),
                        use_tqdm=False, on_output=on_output, keep_outputs=False)
    report = {"pulled_at_first_output": first_at[0], "lookahead": llm.engine.lookahead,
              "kept": len(kept), "greedy": [outs.get(str(i)) for i in range(len(outs))]}
    llm.close()
    return report


def leak_check(model: str) -> dict:
    """Two runs of 25 one-prompt prefill phases each (~50 switches per run): process groups
    and RSS after the first run vs after the second."""
    llm = LLM(model, prefill="P2", decode="T2", num_blocks=16, block_size=4,
              host_kv_tokens=11)
    prompts = [{"prompt_token_ids": [1 + i] + [5] * 7} for i in range(25)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    marks = []
    for _ in range(3):
        llm.generate(prompts, params, use_tqdm=False)
        rss = psutil.Process().memory_info().rss
        box = [None] * dist.get_world_size()
        dist.all_gather_object(box, rss)
        marks.append({"switches": llm.engine.stats.switches, "rss": box,
                      "process_groups": groups.num_process_groups()})
    llm.close()
    return {"marks": marks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("plans", nargs="+", help="PREFILL:DECODE, or a static layout")
    ap.add_argument("--leak", action="store_true")
    ap.add_argument("--policies", help="policy runs for this PREFILL:DECODE plan")
    ap.add_argument("--disk", nargs=2, metavar=("DIR", "PLANS"),
                    help="disk-tier runs in DIR (empty) for comma-separated PLANS")
    args = ap.parse_args()
    report = {}
    for plan in args.plans:
        prefill, _, decode = plan.partition(":")
        report[plan] = run_plan(args.model, prefill, decode or None)
    if args.disk:
        disk_dir, plans = args.disk
        for i, plan in enumerate(plans.split(",")):
            prefill, _, decode = plan.partition(":")
            report[plan].update(disk_runs(args.model, prefill, decode, disk_dir))
            if i == 0:
                report[plan]["abort"] = disk_abort(args.model, prefill, decode, disk_dir)
    if args.policies:
        prefill, _, decode = args.policies.partition(":")
        report["policies"] = policy_runs(args.model, prefill, decode)
        report["stream"] = stream_run(args.model, prefill, decode)
    if args.leak:
        report["leak"] = leak_check(args.model)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(report, f)
    groups.shutdown()


if __name__ == "__main__":
    main()
