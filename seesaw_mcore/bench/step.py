"""Benchmark: per-decode-step work vs batch size (one rank, ``T1``).

    python -m seesaw_mcore.bench.step                  # the bundled tiny model
    python -m seesaw_mcore.bench.step --model DIR --batches 4 64 256 --json out.json

For each batch ``B`` and each mode (greedy; seeded top-k/top-p sampling) it runs
``LLM.generate`` on ``B`` prompts twice, generating ``short`` and ``long`` tokens, and counts
the aten ops dispatched (a ``TorchDispatchMode``) and the wall time of each run. The difference
divided by ``long - short`` is the per-decode-step figure: prefill and start-up cancel. A
data plane whose per-step work does not grow with the batch has ops(B=64) / ops(B=4) near 1.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from seesaw_mcore.bench.common import emit, machine


class OpCounter(TorchDispatchMode):
    """Counts aten ops dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        self.count += 1
        return func(*args, **(kwargs or {}))


def _run(llm, prompts: list[list[int]], params, count: bool) -> tuple[int, float]:
    counter = OpCounter()
    start = time.perf_counter()
    if count:
        with counter:
            llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    else:
        llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return counter.count, time.perf_counter() - start


def per_step(llm, batch: int, sampled: bool, short: int, long: int, prompt_len: int,
             vocab: int, repeats: int = 3) -> dict:
    """Ops and host seconds per decode step at ``batch`` (difference of two lengths)."""
    from seesaw_mcore import SamplingParams

    prompts = [[3 + (i * 7 + j * 13) % (vocab - 3) for j in range(prompt_len)]
               for i in range(batch)]

    def params(n: int):
        if sampled:
            return SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=1, max_tokens=n,
                                  ignore_eos=True)
        return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)

    ops_s, _ = _run(llm, prompts, params(short), True)
    ops_l, _ = _run(llm, prompts, params(long), True)
    times_s, times_l = [], []
    for _ in range(repeats):  # interleaved, best of
        times_s.append(_run(llm, prompts, params(short), False)[1])
        times_l.append(_run(llm, prompts, params(long), False)[1])
    steps = long - short
    return {"batch": batch, "mode": "sampled" if sampled else "greedy",
            "ops_per_step": round((ops_l - ops_s) / steps, 1),
            "ms_per_step": round(1e3 * (min(times_l) - min(times_s)) / steps, 3)}


def plan_cost(batch: int = 256, context: int = 512, block_size: int = 16,
              repeats: int = 50) -> dict:
    """Bytes and host time of one decode step's plan at ``batch`` sequences of ``context``
    tokens: the flat encoding (encode + decode, what every rank pays per step), and building
    the step's attention metadata and sampling tensors."""
    from seesaw_mcore.contract import (
        Phase,
        SamplingSpec,
        ScheduledSeq,
        SchedulerOutput,
        Step,
    )
    from seesaw_mcore.model.attention import AttentionMetadata
    from seesaw_mcore.runtime.sampler import SamplingBatch
    from seesaw_mcore.runtime.step_codec import decode_step, encode_step

    nb = context // block_size
    seqs = [ScheduledSeq(i, [5], context - 1, list(range(i * nb, (i + 1) * nb)),
                         SamplingSpec(0.8, 40, 0.9, 1 << 40 | i, 7, None)) for i in range(batch)]
    step = Step([SchedulerOutput(Phase.DECODE, [seqs])])

    def best(fn) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return round(1e3 * min(times), 3)

    cpu = torch.device("cpu")
    return {
        "batch": batch, "context": context,
        "plan_bytes": int(encode_step(step).nbytes),
        "plan_encode_decode_ms": best(lambda: decode_step(encode_step(step))),
        "metadata_build_ms": best(lambda: AttentionMetadata.build(
            [1] * batch, [context] * batch, [s.block_table for s in seqs], block_size, cpu)),
        "sampling_build_ms": best(lambda: SamplingBatch.build([s.sampling for s in seqs], cpu)),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/tiny-llama")
    ap.add_argument("--batches", type=int, nargs="+", default=[4, 64])
    ap.add_argument("--short", type=int, default=4)
    ap.add_argument("--long", type=int, default=12)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    import json
    import os

    from seesaw_mcore import LLM

    vocab = json.load(open(os.path.join(args.model, "config.json")))["vocab_size"]
    llm = LLM(args.model, prefill="T1", dtype=args.dtype, kv_cache_gib=0.25)
    rows = []
    for sampled in (False, True):
        for b in args.batches:
            rows.append(per_step(llm, b, sampled, args.short, args.long, args.prompt_len, vocab))
    res = {"machine": machine(f"{torch.get_num_threads()} thread(s)"), "model": args.model,
           "dtype": args.dtype, "rows": rows, "plan_at_256": plan_cost()}
    lo, hi = min(args.batches), max(args.batches)
    for mode in ("greedy", "sampled"):
        by = {r["batch"]: r for r in rows if r["mode"] == mode}
        res[f"{mode}_ops_ratio_{hi}_vs_{lo}"] = round(
            by[hi]["ops_per_step"] / by[lo]["ops_per_step"], 2)
    emit(res, args.json)
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
