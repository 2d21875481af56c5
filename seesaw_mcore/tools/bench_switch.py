"""Benchmark: what a Seesaw phase switch costs against its physical floor, and its share of
a long run, next to the static plan on the same requests (run under the launcher).

    deepspeed --no_local_rank --num_gpus 2 --module seesaw_mcore.tools.bench_switch \
        --plan P2:T2 --static T2 --json out.json

The floor is the bytes a switch must move (KV through the host tier both ways, plus weights
copied host -> device, 0 on CPU ranks where the stage views the host shards) divided by the
memcpy bandwidth measured on every rank at once in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time

import torch
import torch.distributed as dist


def memcpy_gbps(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Best-of-``repeats`` copy bandwidth of one rank while every rank copies (GB/s)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    dist.barrier()
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    dist.barrier()
    return nbytes / best / 1e9


def _run(llm, prompts, max_tokens: int) -> float:
    from seesaw_mcore import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    dist.barrier()
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    dist.barrier()
    return time.perf_counter() - t0


def _gather(value) -> list:
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, value)
    return box


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF folder (default: build a ~25M-parameter random Llama)")
    ap.add_argument("--plan", default="P2:T2", help="PREFILL:DECODE")
    ap.add_argument("--static", default="T2", help="static layout to compare with")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=[64, 320])
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--host-kv-tokens", type=int, default=2048)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from seesaw_mcore import LLM
    from seesaw_mcore.runtime import groups

    rank, world = groups.init_distributed()
    box = [args.model]
    if rank == 0 and args.model is None:
        from seesaw_mcore.tools.make_tiny import build_random

        box[0] = build_random(os.path.join(tempfile.mkdtemp(), "bench-llama"), num_layers=6,
                              hidden=512, heads=8, kv_heads=4, intermediate=1408, vocab=8000,
                              init_std=0.02)
    dist.broadcast_object_list(box, src=0)
    path = box[0]
    vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(*args.prompt_len))]
               for _ in range(args.num_prompts)]
    prefill, _, decode = args.plan.partition(":")
    bw = min(_gather(memcpy_gbps()))
    common = dict(kv_cache_gib=1.0, max_prefill_tokens=2048)
    static = LLM(path, prefill=args.static, **common)
    _run(static, prompts[:2], 2)  # warm-up
    st = static.engine.stats
    b0 = (st.prefill_s, st.decode_s)
    static_s = _run(static, prompts, args.max_tokens)
    static_phases = {"prefill_s": round(st.prefill_s - b0[0], 3),
                     "decode_s": round(st.decode_s - b0[1], 3)}
    static.close()
    llm = LLM(path, prefill=prefill, decode=decode, host_kv_tokens=args.host_kv_tokens, **common)
    _run(llm, prompts[:2], 2)
    eng = llm.engine
    p0 = (eng.stats.prefill_s, eng.stats.decode_s)
    base = (eng.stats.switches, eng.stats.switch_s, eng.runner.swap.out_bytes,
            eng.runner.swap.out_s, eng.runner.swap.in_bytes, eng.runner.swap.in_s,
            len(eng.resharder.records))
    wall = _run(llm, prompts, args.max_tokens)
    sw = eng.runner.swap
    recs = eng.resharder.records[base[6]:]
    mine = {
        "switches": eng.stats.switches - base[0], "switch_s": eng.stats.switch_s - base[1],
        "rebuild_s": sum(r.rebuild_s for r in recs), "drain_s": sum(r.drain_s for r in recs),
        "copied_bytes": sum(r.copied_bytes for r in recs),
        "out_bytes": sw.out_bytes - base[2], "out_s": sw.out_s - base[3],
        "in_bytes": sw.in_bytes - base[4], "in_s": sw.in_s - base[5],
    }
    ranks = _gather(mine)
    if rank == 0:
        worst = max(ranks, key=lambda r: r["out_s"] + r["in_s"] + r["rebuild_s"])
        moved = worst["out_bytes"] + worst["in_bytes"] + worst["copied_bytes"]
        floor_s = moved / (bw * 1e9)
        cost_s = worst["out_s"] + worst["in_s"] + worst["rebuild_s"]
        n = max(worst["switches"], 1)
        gen = args.num_prompts * args.max_tokens
        res = {
            "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}"
                       f", {world} CPU ranks x 1 thread",
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
            "floor_s": round(floor_s, 4), "switch_cost_s": round(cost_s, 4),
            "cost_over_floor": round(cost_s / max(floor_s, 1e-9), 2),
            "switch_share_of_run": round((cost_s + worst["drain_s"]) / wall, 4),
            "seesaw_tok_s": round(gen / wall, 1), "static_tok_s": round(gen / static_s, 1),
            "seesaw_phases": {"prefill_s": round(eng.stats.prefill_s - p0[0], 3),
                              "decode_s": round(eng.stats.decode_s - p0[1], 3)},
            "static_phases": static_phases,
        }
        res["seesaw_over_static"] = round(res["seesaw_tok_s"] / res["static_tok_s"], 3)
        print(json.dumps(res, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
