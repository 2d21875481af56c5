"""Benchmark: does ``plan=auto`` pick the fastest plan? Every valid plan of this job's ranks
is measured on the sharegpt-like and arxiv-like workloads next to ``plan=auto`` with and
without its measured trial, against the cost model's predicted ranking (Spearman rank
correlation), all on the same requests in one run (under the launcher).

    deepspeed --no_local_rank --num_gpus 2 --module seesaw_mcore.bench.plans --json out.json

Requests are the suite's (``bench.suite.draw_requests``: log-normal lengths around the planner's
presets, scaled by ``--length-scale`` for CPU ranks); the model ranks with this machine's
measured profile, the run's engine limits, the requests' mean lengths and their number; the
``auto`` runs get the same mean lengths as ``workload="PROMPT:OUTPUT"``. ``--policy-plan
P2:T2`` also compares the three switch policies on that plan with a host tier of about a
third of the first workload's KV. Plans run in
interleaved rounds (round -> workload -> plan); each plan's best round is reported. Each run
is one job on a fresh engine without a warm-up call (first-call costs count alike for every
plan; an ``auto`` run's trial is part of its job).
"""

from __future__ import annotations

import sys
from dataclasses import replace

from seesaw_mcore.bench.common import bench_parser, bench_setup, emit, machine

KV = dict(kv_cache_gib=1.0)  # every run's device KV budget per rank


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long lists (average ranks for ties)."""
    def ranks(xs: list[float]) -> list[float]:
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    n = len(a)
    if n < 2:
        return 1.0
    ra, rb = ranks(a), ranks(b)
    d2 = sum((x - y) ** 2 for x, y in zip(ra, rb))
    return 1 - 6 * d2 / (n * (n * n - 1))


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, prompt_len=(0, 0))
    ap.add_argument("--workloads", nargs="+", default=["sharegpt", "arxiv"])
    ap.add_argument("--length-scale", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--policy-plan", help="also run the three switch policies on this "
                    "Seesaw plan (first workload, host tier ~1/3 of its KV)")
    args = ap.parse_args(argv)
    import json
    import os

    import torch.distributed as dist

    from seesaw_mcore.bench.suite import draw_requests, mean_lengths, run_engine
    from seesaw_mcore.config import EngineConfig
    from seesaw_mcore.planner import CostModel, ModelShape, engine_limits, layouts
    from seesaw_mcore.planner import workload as planner_workload
    from seesaw_mcore.planner.profile import load_or_measure
    from seesaw_mcore.runtime import groups

    rank, world, path, _ = bench_setup(args)
    raw = json.load(open(os.path.join(path, "config.json")))
    hw = load_or_measure(world)
    limits = engine_limits(EngineConfig.from_kwargs(path, **KV))
    loads, models, pairs = {}, {}, {}
    for name in args.workloads:
        reqs = draw_requests(name, args.num_prompts, args.length_scale, raw["vocab_size"],
                            raw.get("max_position_embeddings", 2048), args.seed)
        wl = planner_workload(mean_lengths(reqs))
        model = CostModel(ModelShape.from_config(path), hw,
                          replace(limits, num_requests=len(reqs)))
        pred = {(r["prefill"], r["decode"]): r["tokens_per_s"] for r in model.rank(world, wl)}
        loads[name], models[name] = (reqs, wl), pred
        pairs[name] = [(str(p), str(d)) for p in layouts(world) for d in layouts(world)
                       if (str(p), str(d)) in pred]
    runs: dict[tuple[str, str], list[dict]] = {}
    policies = ("transition_minimizing", "prefill_first", "decode_first")
    first = loads[args.workloads[0]][0]
    host = max(sum(len(r.prompt) + r.max_tokens for r in first) // 3,
               max(len(r.prompt) + r.max_tokens for r in first))  # ~3 fills per run
    for _ in range(args.rounds):  # interleaved: drift hits every run alike
        for name, (reqs, wl) in loads.items():
            for p, d in pairs[name]:
                runs.setdefault((name, f"{p}:{d}" if p != d else p), []).append(
                    run_engine(path, p, d, reqs, warmup=False, **KV))
            for trial in (True, False):
                label = "auto" if trial else "auto (no trial)"
                runs.setdefault((name, label), []).append(run_engine(
                    path, "auto", None, reqs, warmup=False, workload=wl.name, auto_trial=trial,
                    **KV))
        if args.policy_plan:
            pp, _, pd = args.policy_plan.partition(":")
            for policy in policies:
                runs.setdefault(("policy", policy), []).append(run_engine(
                    path, pp, pd, first, warmup=False, host_kv_tokens=host, policy=policy,
                    **KV))
    if rank == 0:
        res = {"machine": machine(f"{world} CPU ranks x 1 thread"), "model": path,
               "num_requests": args.num_prompts, "length_scale": args.length_scale,
               "rounds": args.rounds, "profile": hw.__dict__, "workloads": {}}
        for name, (_, wl) in loads.items():
            best = {label: max(rs, key=lambda r: r["total_tokens_per_s"])
                    for (n, label), rs in runs.items() if n == name}
            rows = []
            for p, d in pairs[name]:
                label = f"{p}:{d}" if p != d else p
                r = best[label]
                rows.append({"plan": label,
                             "measured_tokens_per_s": round(r["total_tokens_per_s"], 1),
                             "rounds_tokens_per_s": [round(x["total_tokens_per_s"], 1)
                                                     for x in runs[(name, label)]],
                             "predicted_tokens_per_s": round(models[name][(p, d)], 1),
                             **{k: round(r[k], 3) for k in ("wall_s", "prefill_s", "decode_s",
                                                            "switch_s")}})
            rows.sort(key=lambda r: -r["measured_tokens_per_s"])
            top = rows[0]["measured_tokens_per_s"]
            autos = {label: {"plan": best[label]["engine_plan"],
                             **{k: round(best[label][k], 3)
                                for k in ("wall_s", "prefill_s", "decode_s", "switch_s")},
                             "tokens_per_s": round(best[label]["total_tokens_per_s"], 1),
                             "vs_best": round(best[label]["total_tokens_per_s"] / top, 3),
                             "rounds_tokens_per_s": [round(x["total_tokens_per_s"], 1)
                                                     for x in runs[(name, label)]],
                             "trial": best[label].get("trial")}
                     for label in ("auto", "auto (no trial)")}
            res["workloads"][name] = {
                "mean_prompt": round(wl.prompt_len, 1), "mean_output": round(wl.output_len, 1),
                "plans": rows, "best": rows[0]["plan"],
                "spearman": round(spearman([r["measured_tokens_per_s"] for r in rows],
                                           [r["predicted_tokens_per_s"] for r in rows]), 3),
                "auto": autos}
        if args.policy_plan:
            res["policies"] = {"plan": args.policy_plan, "workload": args.workloads[0],
                               "host_kv_tokens": host, "runs": {
                                   p: {"tokens_per_s": round(max(
                                       r["total_tokens_per_s"] for r in runs[("policy", p)]), 1),
                                       "switches": runs[("policy", p)][-1]["switches"]}
                                   for p in policies}}
        emit(res, args.json)
    dist.barrier()
    groups.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
