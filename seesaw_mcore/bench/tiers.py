"""Benchmark: KV tier copies against their physical floors, and what swap-out costs prefill
(run under the launcher).

    deepspeed --no_local_rank --num_gpus 2 --module seesaw_mcore.bench.tiers \
        --plan P2:T2 --json out.json

In one run, on the same requests:
- **host tier**: swap-out and swap-in GB/s per rank (copy time on the worker thread, or
  inline) against the memcpy bandwidth measured on every rank at once;
- **prefill with swap-out** overlapped (async), inline (sync), and with swap-out disabled
  (timing only: the KV is dropped, so decode outputs of that run are meaningless); three
  rounds interleaved, best of each;
- **disk tier** (host tier too small, everything goes through the disk): its GB/s against
  raw DeepSpeed AIO writing and reading one 64 MiB buffer on every rank at once in the same
  directory, in one op and in 192 KiB ops (the size of one record chunk of a TP rank).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from seesaw_mcore.bench.common import (
    bench_parser,
    bench_setup,
    emit,
    gather,
    machine,
    memcpy_gbps,
    timed_generate,
)


def _tier_rates(stats, tier: str) -> dict[str, float]:
    t = stats.swap.tiers[tier]
    return {"out_bytes": t.out_bytes, "out_s": t.out_s, "in_bytes": t.in_bytes, "in_s": t.in_s}


def _run(path, plan, prompts, max_tokens, drop_swap_out=False, **cache) -> dict:
    """A fresh engine: one warm-up, then the timed ``generate``; this rank's counters."""
    from seesaw_mcore import LLM

    prefill, _, decode = plan.partition(":")
    llm = LLM(path, prefill=prefill, decode=decode, kv_cache_gib=1.0, max_prefill_tokens=2048,
              **cache)
    if drop_swap_out:
        runner = llm.engine.executor.runner
        execute = runner.execute
        runner.execute = lambda step: execute(dataclasses.replace(step, swap_out=[]))
    timed_generate(llm, prompts[:2], 2)
    st = llm.engine.stats
    before = (st.prefill_s, st.decode_s, st.swap.busy_s, st.swap.wait_s)
    host0, disk0 = _tier_rates(st, "host"), _tier_rates(st, "disk")
    wall = timed_generate(llm, prompts, max_tokens)
    after = (st.prefill_s, st.decode_s, st.swap.busy_s, st.swap.wait_s)
    prefill_s, decode_s, busy_s, wait_s = (a - b for a, b in zip(after, before))
    res = {"wall_s": wall, "prefill_s": prefill_s, "decode_s": decode_s, "busy_s": busy_s,
           "wait_s": wait_s,
           "host": {k: v - host0[k] for k, v in _tier_rates(st, "host").items()},
           "disk": {k: v - disk0[k] for k, v in _tier_rates(st, "disk").items()}}
    llm.close()
    return res


def raw_aio_gbps(directory: str, op_bytes: int, nbytes: int = 64 * 2**20
                 ) -> tuple[float, float]:
    """Write and read GB/s of one rank while every rank moves ``nbytes`` through DeepSpeed
    AIO (same handle settings as the disk tier) in ``directory``, in ops of ``op_bytes``
    all submitted before one wait."""
    from seesaw_mcore.kv.disk_tier import AIO_BLOCK, AIO_QUEUE_DEPTH, load_aio

    aio = load_aio()
    io = aio.aio_handle(AIO_BLOCK, AIO_QUEUE_DEPTH, False, False, 1)
    buf = io.new_cpu_locked_tensor(nbytes // 4, torch.empty(0))
    buf.fill_(1.0)
    fd, name = tempfile.mkstemp(dir=directory)
    try:
        os.ftruncate(fd, nbytes)
        rates = []
        for write in (True, False):
            dist.barrier()
            t0 = time.perf_counter()
            op = io.async_pwrite if write else io.async_pread
            step = op_bytes // 4
            for start in range(0, buf.numel(), step):
                op(buf[start:start + step], f"/proc/self/fd/{fd}", start * 4)
            io.wait()
            rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
        dist.barrier()
    finally:
        os.close(fd)
        os.unlink(name)
    return rates[0], rates[1]


def _gbps(nbytes: float, seconds: float) -> float:
    return round(nbytes / max(seconds, 1e-9) / 1e9, 2)


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--plan", default="P2:T2", help="PREFILL:DECODE")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--disk-dir", default=None, help="disk tier directory (default: a temp "
                    "dir under the current directory, i.e. a real disk, not /tmp's tmpfs)")
    args = ap.parse_args(argv)
    from seesaw_mcore.runtime import groups

    rank, world, path, prompts = bench_setup(args)
    host_tokens = sum(map(len, prompts)) + args.num_prompts * args.max_tokens  # all fit
    bw = min(gather(memcpy_gbps()))
    runs: dict[str, list[dict]] = {"async": [], "sync": [], "no_swap_out": []}
    for _ in range(args.rounds):  # interleaved: drift hits every variant alike
        for name in runs:
            runs[name].append(_run(path, args.plan, prompts, args.max_tokens,
                                   drop_swap_out=name == "no_swap_out",
                                   host_kv_tokens=host_tokens, async_swap=name != "sync"))
    disk_dir = args.disk_dir
    if rank == 0 and disk_dir is None:
        disk_dir = tempfile.mkdtemp(prefix="bench_disk_", dir=os.getcwd())
    box = [disk_dir]
    dist.broadcast_object_list(box, src=0)
    disk_dir = box[0]
    disk = _run(path, args.plan, prompts, args.max_tokens, host_kv_tokens=1,
                disk_path=disk_dir, disk_kv_tokens=2 * host_tokens)
    aio_w, aio_r = (min(x) for x in zip(*gather(raw_aio_gbps(disk_dir, 64 * 2**20))))
    small_w, small_r = (min(x) for x in zip(*gather(raw_aio_gbps(disk_dir, 192 * 2**10))))
    every = gather({"runs": runs, "disk": disk})
    if rank == 0:
        if args.disk_dir is None:
            os.rmdir(disk_dir)

        def best(name: str, key: str = "prefill_s") -> float:  # slowest rank, best round
            return min(max(r["runs"][name][i][key] for r in every) for i in range(args.rounds))

        def worst_rank(name: str) -> dict:  # the rank whose copies took longest, last round
            return max((r["runs"][name][-1] for r in every), key=lambda x: x["busy_s"])

        def rates(run: dict, tier: str) -> dict:
            t = run[tier]
            return {"out_gb_s": _gbps(t["out_bytes"], t["out_s"]),
                    "in_gb_s": _gbps(t["in_bytes"], t["in_s"])}

        a, s = worst_rank("async"), worst_rank("sync")
        d = max((r["disk"] for r in every), key=lambda x: x["busy_s"])
        res = {
            "machine": machine(f"{world} CPU ranks x 1 thread"),
            "model": path, "plan": args.plan, "num_prompts": args.num_prompts,
            "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
            "rounds": args.rounds, "memcpy_gb_s_per_rank": round(bw, 2),
            "host_tier_sync": rates(s, "host"), "host_tier_async": rates(a, "host"),
            "prefill_s": {n: round(best(n), 3) for n in runs},
            "async_overlap": round(max(a["busy_s"] - a["wait_s"], 0) / max(a["busy_s"], 1e-9),
                                   3),
            "disk_dir": disk_dir, "disk_tier": rates(d, "disk"),
            "raw_aio_gb_s": {"write": round(aio_w, 2), "read": round(aio_r, 2)},
            "raw_aio_192k_ops_gb_s": {"write": round(small_w, 2), "read": round(small_r, 2)},
            "disk_bytes_per_rank": {"out": d["disk"]["out_bytes"], "in": d["disk"]["in_bytes"]},
        }
        for mode in ("sync", "async"):
            r = res[f"host_tier_{mode}"]
            r["out_of_memcpy"] = round(r["out_gb_s"] / bw, 3)
            r["in_of_memcpy"] = round(r["in_gb_s"] / bw, 3)
        p = res["prefill_s"]
        res["prefill_over_no_swap_out"] = {"async": round(p["async"] / p["no_swap_out"], 3),
                                           "sync": round(p["sync"] / p["no_swap_out"], 3)}
        res["disk_of_raw_aio"] = {
            "write": round(res["disk_tier"]["out_gb_s"] / max(aio_w, 1e-9), 3),
            "read": round(res["disk_tier"]["in_gb_s"] / max(aio_r, 1e-9), 3)}
        emit(res, args.json)
    groups.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
