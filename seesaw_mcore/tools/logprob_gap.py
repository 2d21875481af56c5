"""The gap between the engine's rollout logprobs and the trainer's: samples generated under
each plan, dtype and mode, then recomputed by megatron-core's ``GPTModel`` forward (the
model a Megatron trainer holds, ``tools/mcore_reference.py``) and by HF ``transformers``.

Run on every rank of a job (plans whose size is the world run; list the others in another
job of their size and the same ``--json``: rows are merged)::

    python -m seesaw_mcore.tools.logprob_gap --model models/tiny-llama --plans T1
    deepspeed --no_local_rank --num_gpus 2 -m seesaw_mcore.tools.logprob_gap \\
        --model models/tiny-llama --plans T2 P2:T2 --json gap.json

``--trainer-tp K`` holds ``GPTModel`` at TP=K over the job's first K ranks (a trainer's
tensor-parallel rounding: a TP plan's bfloat16 partial sums round as such a trainer's do).

Per row (plan, dtype, mode ``default`` / ``invariant``, trainer TP): over every generated
token, the
max and mean ``|engine - GPTModel|`` logprob, and the importance ratio ``r = exp(GPTModel -
engine)`` (trainer over rollout: what truncated importance sampling clips) as mean, p99 and
max of ``|1 - r|``; the same for HF vs ``GPTModel`` on the same samples (``hf_*``), and
whether the engine's logprobs equal ``GPTModel``'s bitwise. ``--ops``: for T1 float32 in
the batch-invariant mode, each op of the first layer run by both on the same inputs
(``GPTModel``'s, captured by hooks), with the size of their difference: where the two
forwards differ, and by how much.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from seesaw_mcore.config import ModelConfig, ParallelConfig, PhasePlan
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.tools import mcore_reference as ref


def stats(engine: list[float], other: list[float]) -> dict:
    """``|engine - other|`` (max, mean) and the ratio ``r = exp(other - engine)``'s mean and
    the p99 and max of ``|1 - r|``, over every token."""
    a, b = np.asarray(engine, np.float64), np.asarray(other, np.float64)
    d = np.abs(a - b)
    r = np.exp(b - a)
    dev = np.abs(1.0 - r)
    return {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "ratio_mean": float(r.mean()), "ratio_p99": float(np.quantile(dev, 0.99)),
            "ratio_max": float(dev.max()), "tokens": int(a.size)}


def generate(model: str, plan: str, dtype: str, invariant: bool, prompts: list[list[int]],
             args) -> list[dict] | None:
    """Sampled completions (temperature ``args.temperature``, seeded) with the engine's
    logprob of each token; rank 0 gets them, other ranks ``None``."""
    from seesaw_mcore import LLM, SamplingParams

    kw = {"host_kv_tokens": 4096} if ":" in plan else {}
    llm = LLM(model, plan=plan, dtype=dtype, batch_invariant=invariant, **kw)
    params = SamplingParams(temperature=args.temperature, seed=args.seed,
                            max_tokens=args.max_tokens, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    llm.close()
    if not llm.is_driver:
        return None
    return [{"prompt": o.prompt_token_ids, "tokens": o.outputs[0].token_ids,
             "logprobs": [e[t].logprob for t, e in zip(o.outputs[0].token_ids,
                                                       o.outputs[0].logprobs)]}
            for o in outs]


def hf_logprobs(path: str, dtype: torch.dtype, ids: list[int], start: int) -> list[float]:
    """HF ``transformers``' float32 log-softmax of each token of ``ids`` from ``start`` on."""
    model = _hf_model(path, dtype)
    dev = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=dev)).logits[0]  # [T, V]
    return ref.next_token_logprobs(logits, ids, start)


_MODELS: dict = {}


def _hf_model(path: str, dtype: torch.dtype):
    key = ("hf", path, dtype)
    if key not in _MODELS:
        from transformers import AutoModelForCausalLM

        from seesaw_mcore.runtime import groups

        _MODELS[key] = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True).to(groups.device()).eval()
    return _MODELS[key]


def _gpt(cfg: ModelConfig, dtype: torch.dtype, tp: int = 1):
    key = ("gpt", cfg.path, dtype, tp)
    if key not in _MODELS:
        _MODELS[key] = ref.build_gpt(cfg, dtype, tp)
    return _MODELS[key]


def compare(cfg: ModelConfig, dtype_name: str, samples: list[dict], tp: int) -> dict | None:
    """The engine's samples recomputed by ``GPTModel`` at TP=``tp`` (every rank of its
    group calls this) and, on rank 0, by HF for an HF folder; the row on rank 0."""
    dtype = getattr(torch, dtype_name)
    gpt = _gpt(cfg, dtype, tp)
    engine, mcore, hf = [], [], []
    lead = dist.get_rank() == 0
    for s in samples:
        ids, start = s["prompt"] + s["tokens"], len(s["prompt"])
        engine += s["logprobs"]
        mcore += ref.token_logprobs(gpt, ids, start, cfg.vocab_size)
        if cfg.format == "hf" and lead:
            hf += hf_logprobs(cfg.path, dtype, ids, start)
    if not lead:
        return None
    row = {**stats(engine, mcore), "bitwise": engine == mcore, "trainer_tp": tp}
    if hf:
        row.update({f"hf_{k}": v for k, v in stats(hf, mcore).items() if k != "tokens"})
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m seesaw_mcore.tools.logprob_gap",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="HF folder or Megatron checkpoint")
    ap.add_argument("--plans", nargs="+", default=["T1"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                    choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--modes", nargs="+", default=["default", "invariant"],
                    choices=["default", "invariant"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trainer-tp", type=int, default=1,
                    help="GPTModel's tensor-parallel size (the job's first ranks)")
    ap.add_argument("--ops", action="store_true",
                    help="the op table (T1, float32, invariant, trainer TP 1)")
    ap.add_argument("--json", help="merge the rows into this JSON file")
    args = ap.parse_args(argv)
    try:
        return _run(args)
    except SeesawError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args) -> int:
    cfg = ModelConfig.open(args.model)
    ref.check_supported(cfg)
    rnd = random.Random(args.seed)
    prompts = [[rnd.randrange(3, cfg.vocab_size) for _ in range(args.prompt_len)]
               for _ in range(args.prompts)]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plans = [p for p in args.plans if PhasePlan.from_string(p).prefill.world_size == world]
    if not plans:
        raise SeesawError(f"none of the plans {' '.join(args.plans)} has {world} ranks")
    tp = args.trainer_tp
    if tp < 1 or world % tp:
        raise SeesawError(f"--trainer-tp must divide the job's {world} ranks, got {tp}")
    runs = {(p, dt, m): generate(args.model, p, dt, m == "invariant", prompts, args)
            for p in plans for dt in args.dtypes for m in args.modes}
    from seesaw_mcore.runtime import groups

    box = [runs]
    dist.broadcast_object_list(box, src=0)  # the samples to every rank of GPTModel's group
    info = groups.activate(ParallelConfig(dp=world // tp, tp=tp))  # megatron-core for GPTModel
    rows = []
    if info.dp_rank == 0:
        for (plan, dt, mode), samples in box[0].items():
            row = compare(cfg, dt, samples, tp)
            if row is not None:
                rows.append({"plan": plan, "dtype": dt, "mode": mode, **row})
    if dist.get_rank() == 0:
        ops = op_table(cfg, prompts[0]) if args.ops and "T1" in plans and tp == 1 else None
        _report(rows, ops, args)
    dist.barrier()
    return 0


def _report(rows: list[dict], ops: list[dict] | None, args) -> None:
    head = ("plan", "dtype", "mode", "trainer_tp", "max_abs", "mean_abs", "ratio_p99", "ratio_max",
            "hf_max_abs", "hf_mean_abs", "bitwise")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(k)) for k in head) + " |")
    if ops:
        print("\nop (layer 0, T1 float32 invariant, the same inputs) | max |delta| | bitwise")
        for o in ops:
            print(f"{o['op']} | {o['max_abs']:.3g} | {o['bitwise']}")
    if args.json:
        old = {}
        if os.path.exists(args.json):
            with open(args.json) as f:
                old = json.load(f)
        keyed = {(r["plan"], r["dtype"], r["mode"], r["trainer_tp"]): r
                 for r in old.get("rows", []) + rows}
        out = {"model": args.model, "rows": list(keyed.values()),
               "ops": ops if ops is not None else old.get("ops")}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if math.isfinite(v) else str(v)
    return "" if v is None else str(v)


def op_table(cfg: ModelConfig, prompt: list[int]) -> list[dict]:
    """Each op of ``GPTModel``'s first layer and head against this engine's, on the inputs
    ``GPTModel`` gave it (float32, batch-invariant mode)."""
    from seesaw_mcore.tools.op_gap import compare_ops

    return compare_ops(cfg, _gpt(cfg, torch.float32), prompt)


if __name__ == "__main__":
    sys.exit(main())
