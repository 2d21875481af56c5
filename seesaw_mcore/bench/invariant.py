"""Benchmark: the cost of batch-invariant mode (``batch_invariant=True``) and of a processed
``logprobs_mode`` against the default, per plan and dtype (run under the launcher, one world
per run).

    python -m seesaw_mcore.bench.invariant --plans T1
    deepspeed --no_local_rank --num_gpus 2 --module seesaw_mcore.bench.invariant --plans T2

On the bench model, the same sampled requests (temperature 1, top-p 0.95, seeded; each asking
for its sampled token's logprob: a rollout)
through an engine in each mode, one engine alive at a time (built, warmed up, timed, closed),
the modes' order rotating round by round; output tokens per second, each mode's best round,
and its ratio to the default's.
"""

from __future__ import annotations

import sys

from seesaw_mcore.bench.common import bench_parser, bench_setup, emit, machine, timed_generate

MODES = {"default": {}, "batch_invariant": {"batch_invariant": True},
         "processed_logprobs": {"logprobs_mode": "processed_logprobs"}}


def main(argv: list[str] | None = None) -> None:
    ap = bench_parser(__doc__, prompt_len=(64, 192))
    ap.add_argument("--plans", nargs="+", default=["T1"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    rank, world, path, prompts = bench_setup(args)
    from seesaw_mcore import LLM, SamplingParams

    out_tokens = len(prompts) * args.max_tokens
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=0, max_tokens=args.max_tokens,
                        ignore_eos=True, logprobs=0)
    results = {"machine": machine(f"{world} rank(s)"), "model": path,
               "requests": len(prompts), "prompt_len": args.prompt_len,
               "max_tokens": args.max_tokens, "runs": []}
    for plan in args.plans:
        for dtype in args.dtypes:
            best = dict.fromkeys(MODES, float("inf"))
            names = list(MODES)
            for r in range(args.rounds):  # interleaved, rotating: drift hits every mode alike
                for mode in names[r % len(names):] + names[:r % len(names)]:
                    llm = LLM(path, plan=plan, dtype=dtype, seed=0, **MODES[mode])
                    timed_generate(llm, prompts[:4], 4, sp)  # warm-up
                    best[mode] = min(best[mode],
                                     timed_generate(llm, prompts, args.max_tokens, sp))
                    llm.close()
            for mode, secs in best.items():
                results["runs"].append({
                    "plan": plan, "dtype": dtype, "mode": mode,
                    "tok_s": round(out_tokens / secs, 1),
                    "vs_default": round(best["default"] / secs, 3)})
    if rank == 0:
        emit(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
