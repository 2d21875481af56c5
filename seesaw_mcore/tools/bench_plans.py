"""Benchmark: every same-DP plan of this job's ranks measured against the planner's
predicted ranking (Spearman rank correlation), and the three phase-switch policies on one
Seesaw plan, all on the same requests in one run (under the launcher).

    deepspeed --no_local_rank --num_gpus 2 --module seesaw_mcore.tools.bench_plans --json out.json

The workload is ShareGPT-shaped but shortened for CPU ranks (seeded: prompts uniform in
``--prompt-len``, outputs in ``--output-len``); the planner gets its mean lengths and the
measured profile of this machine. Plans are run in interleaved rounds; each plan's best round.
"""

from __future__ import annotations

import argparse
import random
import sys

import torch

from seesaw_mcore.tools.results import bench_model, emit, machine, random_prompts


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


def _run(path, prefill, decode, prompts, outputs, **kw) -> dict:
    """Wall time and engine counters of one ``generate`` on a fresh engine (warmed up)."""
    import time

    import torch.distributed as dist

    from seesaw_mcore import LLM, SamplingParams

    llm = LLM(path, prefill=prefill, decode=decode, kv_cache_gib=1.0, max_prefill_tokens=2048,
              **kw)
    reqs = [{"prompt_token_ids": p} for p in prompts]
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in outputs]
    llm.generate(reqs[:2], params[:2], use_tqdm=False)
    st = llm.engine.stats
    switches0 = st.switches
    dist.barrier()
    t0 = time.perf_counter()
    llm.generate(reqs, params, use_tqdm=False)
    dist.barrier()
    wall = time.perf_counter() - t0
    res = {"wall_s": wall, "switches": st.switches - switches0,
           "tokens_per_s": (sum(map(len, prompts)) + sum(outputs)) / wall}
    llm.close()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF folder (default: build a ~25M-parameter random Llama)")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[32, 288])
    ap.add_argument("--output-len", type=int, nargs=2, default=[16, 112])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--policy-plan", default="P2:T2")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import torch.distributed as dist

    from seesaw_mcore.planner import CostModel, ModelShape, Workload, layouts
    from seesaw_mcore.profile import load_or_measure
    from seesaw_mcore.runtime import groups

    rank, world = groups.init_distributed()
    path = bench_model(args.model)
    prompts = random_prompts(path, args.num_prompts, args.prompt_len)
    rng = random.Random(1)
    outputs = [rng.randint(*args.output_len) for _ in prompts]
    total = sum(map(len, prompts)) + sum(outputs)
    wl = Workload("bench", sum(map(len, prompts)) / len(prompts), sum(outputs) / len(outputs))
    hw = load_or_measure(world)
    predicted = {(r["prefill"], r["decode"]): r["tokens_per_s"]
                 for r in CostModel(ModelShape.from_config(path), hw).rank(world, wl)}
    pairs = [(str(p), str(d)) for p in layouts(world) for d in layouts(world)
             if p.dp == d.dp and (str(p), str(d)) in predicted]
    host = max(total // 3, max(map(len, prompts)) + max(outputs))  # ~3 fills per run
    measured: dict[tuple[str, str], list[float]] = {pair: [] for pair in pairs}
    policies = ("transition_minimizing", "prefill_first", "decode_first")
    pol: dict[str, list[dict]] = {p: [] for p in policies}
    pp, pd = args.policy_plan.split(":")
    for _ in range(args.rounds):  # interleaved: drift hits every run alike
        for p, d in pairs:
            kw = {} if p == d else {"host_kv_tokens": 4 * total}
            measured[(p, d)].append(_run(path, p, d, prompts, outputs, **kw)["tokens_per_s"])
        for policy in policies:
            pol[policy].append(_run(path, pp, pd, prompts, outputs, host_kv_tokens=host,
                                    policy=policy))
    if rank == 0:
        best = {pair: max(v) for pair, v in measured.items()}
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
            "policies": {p: {"tokens_per_s": round(max(r["tokens_per_s"] for r in runs), 1),
                             "switches": runs[-1]["switches"]} for p, runs in pol.items()},
        }
        emit(res, args.json)
    dist.barrier()
    groups.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
