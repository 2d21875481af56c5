"""Benchmark: this engine (one rank) vs HF ``transformers`` ``generate`` (batched, left-padded)
on the same checkpoint and the same mixed-length prompts, in one process, interleaved.

    python -m seesaw_mcore.bench.hf                 # builds a ~30M random Llama
    python -m seesaw_mcore.bench.hf --model DIR --num-prompts 64 --json out.json

Both run greedy with EOS ignored, so both generate exactly ``--max-tokens`` per prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

import torch

from seesaw_mcore.bench.common import emit, machine


def hf_generate_timed(model, prompts: list[list[int]], max_tokens: int, batch: int,
                      device: torch.device | None = None) -> float:
    """Seconds for HF ``generate`` over ``prompts`` in left-padded batches of ``batch``
    (greedy, EOS ignored: exactly ``max_tokens`` each)."""
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(prompts), batch):
            chunk = prompts[i : i + batch]
            width = max(len(p) for p in chunk)
            ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk],
                               device=device)  # left padding
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk],
                                device=device)
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=max_tokens,
                           min_new_tokens=max_tokens, eos_token_id=None, pad_token_id=0)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _engine_run(llm, prompts: list[list[int]], max_tokens: int) -> float:
    from seesaw_mcore import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="HF folder (default: build a ~30M-parameter random Llama)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hf-batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    path = args.model
    if path is None:
        from seesaw_mcore.bench.models import build_random

        path = build_random(os.path.join(tempfile.mkdtemp(), "bench-llama"), num_layers=8,
                            hidden=512, heads=8, kv_heads=4, intermediate=1408, vocab=8000,
                            init_std=0.02)
    from transformers import AutoModelForCausalLM

    from seesaw_mcore import LLM

    rng = random.Random(0)
    cfg_vocab = json.load(open(os.path.join(path, "config.json")))["vocab_size"]
    prompts = [[rng.randrange(3, cfg_vocab) for _ in range(rng.randint(args.min_len,
                                                                        args.max_len))]
               for _ in range(args.num_prompts)]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                              use_safetensors=True).eval()
    llm = LLM(path, prefill="T1", kv_cache_gib=2.0)
    hf_generate_timed(hf, prompts[:2], 4, args.hf_batch)  # warm-up both
    _engine_run(llm, prompts[:2], 4)
    hf_t, eng_t = [], []
    for _ in range(args.repeats):  # interleaved so machine drift hits both alike
        hf_t.append(hf_generate_timed(hf, prompts, args.max_tokens, args.hf_batch))
        eng_t.append(_engine_run(llm, prompts, args.max_tokens))
    gen = args.num_prompts * args.max_tokens
    res = {
        "machine": machine("1 thread each"),
        "model": path, "params_m": round(sum(p.numel() for p in hf.parameters()) / 1e6, 1),
        "num_prompts": args.num_prompts, "prompt_len": [args.min_len, args.max_len],
        "max_tokens": args.max_tokens, "hf_batch": args.hf_batch,
        "hf_tok_s": round(gen / statistics.median(hf_t), 1),
        "engine_tok_s": round(gen / statistics.median(eng_t), 1),
    }
    res["ratio"] = round(res["engine_tok_s"] / res["hf_tok_s"], 2)
    emit(res, args.json)
    llm.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
