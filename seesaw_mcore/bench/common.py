"""What the benchmark tools share: the machine line, the bench model and workload, timed
runs, and how results are reported. Run under the launcher (every rank calls these)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import tempfile
import time

import torch
import torch.distributed as dist


def machine(threads: str) -> str:
    """``x86_64 2 cores, torch 2.13.0+cpu, <threads>``."""
    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {threads}"


def emit(results: dict, path: str | None) -> None:
    """Prints ``results`` as JSON and writes them to ``path`` when given."""
    print(json.dumps(results, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def gather(value) -> list:
    """``value`` from every rank, in rank order."""
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, value)
    return box


def bench_model(path: str | None) -> str:
    """``path``, or (rank 0 builds, all agree) a ~25M-parameter random Llama in a temp dir."""
    box = [path]
    if dist.get_rank() == 0 and path is None:
        from seesaw_mcore.bench.models import build_random

        box[0] = build_random(os.path.join(tempfile.mkdtemp(), "bench-llama"), num_layers=6,
                              hidden=512, heads=8, kv_heads=4, intermediate=1408, vocab=8000,
                              init_std=0.02)
    dist.broadcast_object_list(box, src=0)
    return box[0]


def random_prompts(model: str, n: int, lengths: tuple[int, int], seed: int = 0
                   ) -> list[list[int]]:
    """``n`` prompts of random token ids, lengths uniform in ``lengths``."""
    vocab = json.load(open(os.path.join(model, "config.json")))["vocab_size"]
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))] for _ in range(n)]


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


def timed_generate(llm, prompts: list[list[int]], max_tokens: int, sp=None) -> float:
    """Wall seconds of one ``generate`` of ``prompts`` over every rank (``sp``: its
    ``SamplingParams``; default greedy)."""
    from seesaw_mcore import SamplingParams

    sp = sp or SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    dist.barrier()
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    dist.barrier()
    return time.perf_counter() - t0


def bench_parser(doc: str, prompt_len: tuple[int, int] = (64, 320)) -> argparse.ArgumentParser:
    """The options every benchmark tool has: ``--model``, ``--num-prompts``, ``--prompt-len``,
    ``--json`` (its first docstring line as description)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--model", help="HF folder (default: build a ~25M-parameter random Llama)")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=list(prompt_len))
    ap.add_argument("--json", help="write the results here")
    return ap


def bench_setup(args: argparse.Namespace) -> tuple[int, int, str, list[list[int]]]:
    """One thread per rank, the process groups, the model and the prompts:
    ``(rank, world, model path, prompts)``."""
    from seesaw_mcore.runtime import groups

    torch.set_num_threads(1)
    rank, world = groups.init_distributed()
    path = bench_model(args.model)
    return rank, world, path, random_prompts(path, args.num_prompts, args.prompt_len)
