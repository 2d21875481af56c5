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


def host_cost(batch: int = 256, context: int = 512, block_size: int = 16,
              penalties: bool = False, repeats: int = 30) -> dict:
    """Host work of one decode step outside the forward at ``batch`` sequences of
    ``context`` tokens (``penalties``: repetition penalty, so the sampler needs each
    sequence's history): the scheduler's decode step, the step message (bytes, and encode on
    rank 0 + decode on another rank through their mirrors, in steady state), the attention
    metadata and the sampler's per-row tensors. Best of ``repeats``, ms."""
    from seesaw_mcore.config import SchedulerConfig
    from seesaw_mcore.contract import Step
    from seesaw_mcore.engine.request import Sequence
    from seesaw_mcore.engine.scheduler import ReplicaScheduler
    from seesaw_mcore.kv.block_pool import BlockPool
    from seesaw_mcore.model.attention import AttentionMetadata
    from seesaw_mcore.runtime.sampling_batch import SamplingBatch
    from seesaw_mcore.runtime.step_codec import SeqMirror, decode_step, encode_step
    from seesaw_mcore.sampling_params import SamplingParams

    nb = -(-(context + 2 * repeats + 8) // block_size)
    sched = ReplicaScheduler(SchedulerConfig(max_num_seqs=batch, max_prefill_tokens=1 << 30),
                             BlockPool(batch * nb, block_size), 1)
    sp = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, max_tokens=1 << 20,
                        repetition_penalty=1.1 if penalties else 1.0)
    for i in range(batch):
        sched.add(Sequence(i, i, 0, [3 + (i + j) % 97 for j in range(context)], sp, i, 1 << 20))
    sched.schedule()  # the prefill
    enc, dec = SeqMirror(), SeqMirror()
    enc.active = True
    times: dict[str, list[float]] = {k: [] for k in ("schedule", "message", "metadata",
                                                     "sampler")}
    size = 0
    cpu = torch.device("cpu")
    for _ in range(repeats):
        for seq in sched.running:
            seq.output_token_ids.append(5)
        t0 = time.perf_counter()
        out = sched.schedule()
        t1 = time.perf_counter()
        data = encode_step(Step([out]), enc)
        decode_step(data, dec)
        t2 = time.perf_counter()
        seqs = out.seqs
        AttentionMetadata.build([1] * len(seqs), [s.start_pos + 1 for s in seqs],
                                [s.block_table for s in seqs], block_size, cpu)
        t3 = time.perf_counter()
        SamplingBatch.build([s.sampling for s in seqs], cpu)
        t4 = time.perf_counter()
        size = len(data)
        for k, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            times[k].append(dt)
    ms = {f"{k}_ms": round(1e3 * min(v), 3) for k, v in times.items()}
    return {"batch": batch, "context": context, "penalties": penalties,
            "message_bytes": size, "message_bytes_per_seq": round(size / batch, 1),
            **ms, "host_ms": round(sum(ms.values()), 3)}


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
           "dtype": args.dtype, "rows": rows,
           "host_per_decode_step": [host_cost(b, ctx, penalties=pen) for pen in (False, True)
                                    for ctx in (512, 4096) for b in (16, 64, 256)]}
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
