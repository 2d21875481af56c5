"""Benchmark: every same-DP plan of this job's ranks measured against the planner's
predicted ranking (Spearman rank correlation), and the three phase-switch policies on one
Seesaw plan, all on the same requests in one run (under the launcher).

    deepspeed --no_local_rank --num_gpus 2 --module seesaw_mcore.bench.plans --json out.json

The workload is ShareGPT-shaped but shortened for CPU ranks (seeded: prompts uniform in
``--prompt-len``, outputs in ``--output-len``); the planner gets its mean lengths and the
measured profile of this machine. Plans are run in interleaved rounds; each plan's best round.
"""

from __future__ import annotations

import random
import sys

from seesaw_mcore.bench.common import bench_parser, bench_setup, emit, machine


def _spearman(a: list[float], b: list[float]) -> float:
    def ranks(xs):
        order = sorted(range(len(xs)), key=lambda i: xs[i])
        r = [0.0] * len(xs)
        for pos, i in enumerate(order):
            r[i] = float(pos)
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    d2 = sum((x - y) ** 2 for x, y in zip(ra, rb))
    return 1 - 6 * d2 / (n * (n * n - 1)) if n > 1 else 1.0


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__, prompt_len=(32, 288))
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 112])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--policy-plan", default="P2:T2")
    args = ap.parse_args(argv)
    import torch.distributed as dist

    from seesaw_mcore.bench.suite import Request, run_engine
    from seesaw_mcore.planner import CostModel, ModelShape, Workload, layouts
    from seesaw_mcore.planner.profile import load_or_measure
    from seesaw_mcore.runtime import groups

    rank, world, path, prompts = bench_setup(args)
    rng = random.Random(1)
    outputs = [rng.randint(*args.output_len) for _ in prompts]
    reqs = [Request(p, o) for p, o in zip(prompts, outputs)]
    common = dict(kv_cache_gib=1.0, max_prefill_tokens=2048)
    total = sum(map(len, prompts)) + sum(outputs)
    wl = Workload("bench", sum(map(len, prompts)) / len(prompts), sum(outputs) / len(outputs))
    hw = load_or_measure(world)
    predicted = {(r["prefill"], r["decode"]): r["tokens_per_s"]
                 for r in CostModel(ModelShape.from_config(path), hw).rank(world, wl)}
    pairs = [(str(p), str(d)) for p in layouts(world) for d in layouts(world)
             if p.dp == d.dp and (str(p), str(d)) in predicted]
    host = max(total // 3, max(map(len, prompts)) + max(outputs))  # ~3 fills per run
    measured: dict[tuple[str, str], list[dict]] = {pair: [] for pair in pairs}
    policies = ("transition_minimizing", "prefill_first", "decode_first")
    pol: dict[str, list[dict]] = {p: [] for p in policies}
    pp, pd = args.policy_plan.split(":")
    for _ in range(args.rounds):  # interleaved: drift hits every run alike
        for p, d in pairs:
            kw = {} if p == d else {"host_kv_tokens": 4 * total}
            measured[(p, d)].append(run_engine(path, p, d, reqs, **common, **kw))
        for policy in policies:
            pol[policy].append(run_engine(path, pp, pd, reqs, **common, host_kv_tokens=host,
                                          policy=policy))
    if rank == 0:
        best = {pair: max(r["total_tokens_per_s"] for r in v) for pair, v in measured.items()}
        rows = sorted(({"prefill": p, "decode": d, "measured_tokens_per_s": round(best[(p, d)], 1),
                        "predicted_tokens_per_s": round(predicted[(p, d)], 1)}
                       for p, d in pairs), key=lambda r: -r["measured_tokens_per_s"])
        rho = _spearman([r["measured_tokens_per_s"] for r in rows],
                        [r["predicted_tokens_per_s"] for r in rows])
        res = {
            "machine": machine(f"{world} CPU ranks x 1 thread"), "model": path,
            "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
            "output_len": args.output_len, "rounds": args.rounds,
            "profile": hw.__dict__, "plans": rows, "spearman": round(rho, 3),
            "policy_plan": args.policy_plan, "host_kv_tokens": host,
            "policies": {p: {"tokens_per_s": round(max(r["total_tokens_per_s"] for r in runs),
                                                   1),
                             "switches": runs[-1]["switches"]} for p, runs in pol.items()},
        }
        emit(res, args.json)
    dist.barrier()
    groups.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
