"""Benchmark: what a Seesaw phase switch costs against its physical floor, and its share of
a long run, next to the static plan on the same requests (run under the launcher).

    deepspeed --no_local_rank --num_gpus 2 --module seesaw_mcore.bench.switch \
        --plan P2:T2 --static T2 --json out.json

The floor is the bytes a switch must move (KV through the host tier both ways, plus weights
copied host -> device, 0 on CPU ranks where the stage views the host shards) divided by the
memcpy bandwidth measured on every rank at once in the same run. Against it: the copy time
(on the background thread, overlapping compute) and the exposed cost (what the ranks waited
for: unfinished copies plus the stage rebuild; the barrier is reported as drain).
"""

from __future__ import annotations

import sys

from seesaw_mcore.bench.common import (
    bench_parser,
    bench_setup,
    emit,
    gather,
    machine,
    memcpy_gbps,
    timed_generate,
)


def _counters(eng) -> dict[str, float]:
    st, host = eng.stats, eng.stats.swap.tiers["host"]
    return {"prefill_s": st.prefill_s, "decode_s": st.decode_s, "switches": st.switches,
            "out_bytes": host.out_bytes, "out_s": host.out_s, "in_bytes": host.in_bytes,
            "in_s": host.in_s, "wait_s": st.swap.wait_s}


def _run(llm, prompts, max_tokens: int) -> tuple[float, dict[str, float], list]:
    """One greedy ``generate``: wall seconds, what it added to this rank's engine counters,
    and its switch records."""
    eng = llm.engine
    before, n0 = _counters(eng), len(eng.executor.worker.resharder.records)
    wall = timed_generate(llm, prompts, max_tokens)
    added = {k: v - before[k] for k, v in _counters(eng).items()}
    return wall, added, eng.executor.worker.resharder.records[n0:]


def _phases(added: dict[str, float]) -> dict[str, float]:
    return {k: round(added[k], 3) for k in ("prefill_s", "decode_s")}


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--plan", default="P2:T2", help="PREFILL:DECODE")
    ap.add_argument("--static", default="T2", help="static layout to compare with")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--host-kv-tokens", type=int, default=2048)
    args = ap.parse_args(argv)
    from seesaw_mcore import LLM

    rank, world, path, prompts = bench_setup(args)
    prefill, _, decode = args.plan.partition(":")
    bw = min(gather(memcpy_gbps()))
    common = dict(kv_cache_gib=1.0, max_prefill_tokens=2048)
    static = LLM(path, prefill=args.static, **common)
    _run(static, prompts[:2], 2)  # warm-up
    static_s, static_added, _ = _run(static, prompts, args.max_tokens)
    static.close()
    llm = LLM(path, prefill=prefill, decode=decode, host_kv_tokens=args.host_kv_tokens, **common)
    _run(llm, prompts[:2], 2)
    wall, mine, recs = _run(llm, prompts, args.max_tokens)
    mine.update(rebuild_s=sum(r.rebuild_s for r in recs), drain_s=sum(r.drain_s for r in recs),
                copied_bytes=sum(r.copied_bytes for r in recs))
    ranks = gather(mine)
    if rank == 0:
        worst = max(ranks, key=lambda r: r["wait_s"] + r["rebuild_s"])
        moved = worst["out_bytes"] + worst["in_bytes"] + worst["copied_bytes"]
        floor_s = moved / (bw * 1e9)
        copy_s = worst["out_s"] + worst["in_s"]  # on the worker thread (or inline)
        cost_s = worst["wait_s"] + worst["rebuild_s"]  # what the ranks actually waited for
        n = max(worst["switches"], 1)
        gen = args.num_prompts * args.max_tokens
        res = {
            "machine": machine(f"{world} CPU ranks x 1 thread"),
            "model": path, "plan": f"{prefill} -> {decode}", "static": args.static,
            "num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
            "max_tokens": args.max_tokens, "host_kv_tokens": args.host_kv_tokens,
            "memcpy_gb_s_per_rank": round(bw, 2),
            "switches": worst["switches"],
            "per_switch_ms": {"rebuild": round(worst["rebuild_s"] / n * 1e3, 2),
                              "drain": round(worst["drain_s"] / n * 1e3, 2)},
            "kv_out_gb_s": round(worst["out_bytes"] / max(worst["out_s"], 1e-9) / 1e9, 2),
            "kv_in_gb_s": round(worst["in_bytes"] / max(worst["in_s"], 1e-9) / 1e9, 2),
            "bytes_moved_per_rank": moved,
            "floor_s": round(floor_s, 4), "copy_s": round(copy_s, 4),
            "exposed_cost_s": round(cost_s, 4),
            "copy_over_floor": round(copy_s / max(floor_s, 1e-9), 2),
            "exposed_over_floor": round(cost_s / max(floor_s, 1e-9), 2),
            "switch_share_of_run": round((cost_s + worst["drain_s"]) / wall, 4),
            "seesaw_tok_s": round(gen / wall, 1), "static_tok_s": round(gen / static_s, 1),
            "seesaw_phases": _phases(mine), "static_phases": _phases(static_added),
        }
        res["seesaw_over_static"] = round(res["seesaw_tok_s"] / res["static_tok_s"], 3)
        emit(res, args.json)
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
