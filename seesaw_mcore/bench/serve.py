"""Benchmark: this engine's OpenAI server vs ``vllm serve`` (vLLM's CPU build), measured by
vLLM's own serving benchmark client, and the server vs the offline ``LLM.generate`` on
requests of the same shape.

    python -m seesaw_mcore.bench.serve --vllm-python .venv-vllm/bin/python \
        --json docs/bench/serve.json

Both servers run the same model on the same cores (``taskset``), started once and warmed
up (a 16-prompt client run each); the client (vLLM's ``vllm.benchmarks.serve``, random
dataset: ``--num-prompts`` prompts of ``--input-len`` tokens, ``--output-len`` new tokens
each, EOS ignored; new prompts each round, the same for both sides within a round) runs
against each in turn, round after round, at each request rate (``inf``: every request at
once), each with the same KV cache memory (``--kv-gib``: vLLM's
``VLLM_CPU_KVCACHE_SPACE``). Then the offline engine generates requests of the same shape
(random token prompts) on the same cores. Reported per side and rate: the best round's output
tokens/s and request throughput, with that round's TTFT and TPOT p50 / p99.

Default model: a random Llama shaped like SmolLM-135M (30 layers, hidden 576, 9/3 heads)
with the bundled tiny model's 2,048-token tokenizer (the client makes its prompts with it),
float32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from seesaw_mcore.bench.common import emit, machine
from seesaw_mcore.runtime.groups import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CLIENT = """import argparse, sys
from vllm.benchmarks.serve import add_cli_args, main
p = argparse.ArgumentParser()
add_cli_args(p)
main(p.parse_args(sys.argv[1:]))
"""
KEYS = ("completed", "output_throughput", "request_throughput", "median_ttft_ms",
        "p99_ttft_ms", "median_tpot_ms", "p99_tpot_ms")


def bench_model(root: str) -> str:
    """The default model: SmolLM-135M's shape, the bundled tokenizer's vocabulary."""
    from seesaw_mcore.bench.models import build_random

    path = build_random(os.path.join(root, "smol-135m-v2048"), num_layers=30, hidden=576,
                        heads=9, kv_heads=3, intermediate=1536, vocab=2048, tie=True,
                        init_std=0.06, max_positions=2048)
    for f in TOKENIZER_FILES:
        src = os.path.join(REPO, "models", "tiny-llama", f)
        if os.path.exists(src):
            shutil.copy(src, path)
    return path


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float, log: str) -> None:
    import urllib.request

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}):\n{open(log).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:  # noqa: S310
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {timeout}s:\n{open(log).read()[-3000:]}")


def start_servers(args, work: str) -> dict[str, tuple[subprocess.Popen, str]]:
    """Both servers, pinned to ``args.cores``, healthy; name -> (process, url)."""
    taskset = ["taskset", "-c", args.cores]
    threads = len(os.sched_getaffinity(0)) if args.cores is None else _count(args.cores)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    servers = {}
    port = free_port()
    ranks = _ranks(args.plan)
    serve = [os.path.join(REPO, "launch", "serve.py"), f"model.path={args.model}",
             f"plan={args.plan}", "dtype=float32", f"server.port={port}",
             "server.served_model_name=bench", "server.max_queued_requests=100000",
             f"cache.kv_cache_gib={args.kv_gib / ranks}"]  # the same memory in all
    if ranks == 1:
        cmd = [sys.executable, *serve]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--no_local_rank",
               "--num_gpus", str(ranks), "--master_port", str(free_port()), *serve]
    servers["seesaw"] = _launch(taskset + cmd, dict(env, OMP_NUM_THREADS=str(threads // ranks)),
                                os.path.join(work, "seesaw.log"), port, args.start_timeout)
    vport = free_port()
    vcmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model",
            args.model, "--served-model-name", "bench", "--dtype", "float32", "--port",
            str(vport), "--host", "127.0.0.1", "--max-model-len", "2048"]
    venv = dict(env, VLLM_CPU_KVCACHE_SPACE=str(args.kv_gib), VLLM_CPU_OMP_THREADS_BIND=args.cores,
                OMP_NUM_THREADS=str(threads))
    servers["vllm"] = _launch(taskset + vcmd, venv, os.path.join(work, "vllm.log"), vport,
                              args.start_timeout)
    return servers


def _launch(cmd, env, log, port, timeout) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    _wait_healthy(url, proc, timeout, log)
    return proc, url


def _ranks(plan: str) -> int:
    """Ranks of a plan this benchmark runs: ``T1`` one, the others two."""
    return 1 if plan.upper() == "T1" else 2


def _count(cores: str) -> int:
    n = 0
    for part in cores.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def run_client(args, url: str, rate: str, work: str, tag: str, seed: int,
               num_prompts: int | None = None) -> dict:
    """One run of vLLM's benchmark client against ``url`` (its random prompts drawn with
    ``seed``); its result's key figures."""
    out = os.path.join(work, f"{tag}.json")
    cmd = [args.vllm_python, "-c", CLIENT, "--backend", "vllm", "--base-url", url,
           "--endpoint", "/v1/completions", "--model", "bench", "--tokenizer", args.model,
           "--dataset-name", "random", "--random-input-len", str(args.input_len),
           "--random-output-len", str(args.output_len), "--num-prompts",
           str(num_prompts or args.num_prompts), "--request-rate", rate, "--ignore-eos",
           "--seed", str(seed),
           "--save-result", "--result-dir", work, "--result-filename", f"{tag}.json",
           "--disable-tqdm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.run_timeout,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"client failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    res = json.load(open(out))
    return {k: res.get(k) for k in KEYS}


def offline(args) -> dict:
    """``LLM.generate`` on random token prompts of the client's shape (this process)."""
    from seesaw_mcore import LLM, SamplingParams
    from seesaw_mcore.bench.common import random_prompts

    llm = LLM(args.model, plan=args.plan, dtype="float32",
              kv_cache_gib=args.kv_gib / _ranks(args.plan))
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    shape = (args.input_len, args.input_len)
    warm = random_prompts(args.model, 16, shape, seed=999)
    llm.generate([{"prompt_token_ids": p} for p in warm], params, use_tqdm=False)
    best = None
    for rnd in range(args.rounds):  # new prompts each round: no prefix-cache hit
        ids = [{"prompt_token_ids": p}
               for p in random_prompts(args.model, args.num_prompts, shape, seed=rnd + 1)]
        t0 = time.perf_counter()
        outs = llm.generate(ids, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        if llm.is_driver:
            toks = sum(len(o.outputs[0].token_ids) for o in outs)
            r = {"output_throughput": toks / dt, "request_throughput": len(outs) / dt}
            best = r if best is None or r["output_throughput"] > best[
                "output_throughput"] else best
    llm.shutdown()
    return best or {}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vllm-python", help="python of a vllm-cpu environment (make bench-vllm)")
    ap.add_argument("--model", help="HF folder with a tokenizer (default: see the module doc)")
    ap.add_argument("--plan", default="D2", help="this engine's plan (1 or 2 ranks)")
    ap.add_argument("--cores", default="0-1", help="taskset cores for both servers")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--rates", nargs="+", default=["inf", "4"])
    ap.add_argument("--kv-gib", type=float, default=2, help="KV cache per server (GiB), both")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--run-timeout", type=float, default=1800)
    ap.add_argument("--offline-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    if args.offline_only:
        best = offline(args)
        if best:  # rank 0
            print("OFFLINE " + json.dumps(best), flush=True)
        return 0
    if not args.vllm_python or not os.access(args.vllm_python, os.X_OK):
        print(f"error: --vllm-python {args.vllm_python} is not an executable; make one with "
              "`make bench-vllm`", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="bench-serve-")
    args.model = args.model or bench_model(work)
    res = {"machine": machine(f"cores {args.cores}"), "model": args.model, "dtype": "float32",
           "plan": args.plan, "kv_cache_gib": args.kv_gib,
           "client": "vllm.benchmarks.serve (vLLM-CPU 0.32.0), random "
           f"dataset, {args.num_prompts} prompts x {args.input_len} tokens, "
           f"{args.output_len} new tokens, ignore_eos", "rates": {}}
    servers = start_servers(args, work)
    try:
        for side, (_, url) in servers.items():  # warm-up: first-call costs out of the figures
            run_client(args, url, "inf", work, f"{side}-warmup", seed=999, num_prompts=16)
        seed = 0
        for rate in args.rates:
            runs: dict[str, list[dict]] = {"seesaw": [], "vllm": []}
            for rnd in range(args.rounds):
                # new prompts each round (no prefix-cache hit from an earlier one), the same
                # prompts for both sides within a round
                seed += 1
                order = ["seesaw", "vllm"] if rnd % 2 == 0 else ["vllm", "seesaw"]
                for side in order:
                    runs[side].append(run_client(args, servers[side][1], rate, work,
                                                 f"{side}-{rate}-{rnd}", seed))
            best = {s: max(r, key=lambda x: x["output_throughput"]) for s, r in runs.items()}
            best["ratio_output_tok_s"] = (best["seesaw"]["output_throughput"]
                                          / best["vllm"]["output_throughput"])
            best["rounds"] = runs
            res["rates"][rate] = best
            print(json.dumps({rate: {s: best[s] for s in ("seesaw", "vllm")}}), flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
        for proc, _ in servers.values():
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
    launcher = [sys.executable] if _ranks(args.plan) == 1 else [
        os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--no_local_rank",
        "--num_gpus", "2", "--master_port", str(free_port()), "--module"]
    cmd = ["taskset", "-c", args.cores, *launcher, *(["-m"] if len(launcher) == 1 else []),
           "seesaw_mcore.bench.serve", "--offline-only", "--model", args.model, "--plan",
           args.plan, "--num-prompts", str(args.num_prompts), "--input-len",
           str(args.input_len), "--output-len", str(args.output_len), "--rounds",
           str(args.rounds), "--kv-gib", str(args.kv_gib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=args.run_timeout)
    line = [x for x in proc.stdout.splitlines() if x.startswith("OFFLINE ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"offline run failed:\n{proc.stderr[-3000:]}")
    res["offline"] = json.loads(line[0][len("OFFLINE "):])
    inf = res["rates"].get("inf")
    if inf:
        res["server_vs_offline"] = (inf["seesaw"]["output_throughput"]
                                    / res["offline"]["output_throughput"])
    emit(res, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
