"""Parity check against HF ``transformers``: teacher-forced logits and greedy tokens.

Run on every rank (SPMD), e.g.::

    deepspeed --no_local_rank --num_gpus 2 -m seesaw_mcore.tools.parity \
        --model models/tiny-llama --layouts T2 P2

Each layout is activated in turn on the same ranks; rank 0 writes a JSON report and, with
``--check``, compares with HF on the spot and prints a verdict per layout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

from seesaw_mcore.config import ModelConfig, ParallelConfig, check_world
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.runtime import groups
from seesaw_mcore.runtime.dtype import resolve_dtype
from seesaw_mcore.runtime.model_runner import ModelRunner

DEFAULT_PROMPTS = [
    "The function returns a list of",
    "Return the number of bytes",
    "This module provides",
    "If the file does not exist, the",
]


def run_layout(
    cfg: ModelConfig, layout: ParallelConfig, prompts: list[list[int]], max_new: int, dtype
) -> dict | None:
    """Teacher-forced logits over each prompt and ``max_new`` greedy tokens, under ``layout``.

    Returns:
        On rank 0: ``{"logits": [[T_i, V] per prompt], "tokens": [[max_new] per prompt]}``.
    """
    block_size = 16
    lens = [len(p) for p in prompts]
    per_seq = -(-(max(lens) + max_new) // block_size)
    runner = ModelRunner(cfg, layout, dtype, block_size)
    runner.allocate_kv(per_seq * len(prompts))
    tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompts))]
    src = layout.rank_of(0, 0, layout.pp - 1)  # replica 0's last stage (every replica
    # runs the same prompts: D and E layouts too)
    flat = [t for p in prompts for t in p]
    logits = runner.forward(flat, lens, lens, tables, list(range(len(flat))))
    all_logits = _bcast(logits, (len(flat), cfg.vocab_size), src)  # [T, V]
    ends = torch.tensor(lens).cumsum(0) - 1
    next_tok = all_logits[ends].argmax(-1)  # [B]
    generated = [next_tok]
    ctx = list(lens)
    for _ in range(max_new - 1):
        logits = runner.forward(next_tok.tolist(), [1] * len(ctx),
                                [c + 1 for c in ctx], tables, list(range(len(ctx))))
        next_tok = _bcast(logits, (len(ctx), cfg.vocab_size), src).argmax(-1)
        generated.append(next_tok)
        ctx = [c + 1 for c in ctx]
    if dist.get_rank() != 0:
        return None
    tokens = torch.stack(generated, dim=1)  # [B, max_new]
    splits = all_logits.split(lens)
    layer = runner.model.layers[0]
    route = "none" if layout.tp == 1 else ("shm" if layer.o_proj.reduce.fast else "gloo")
    return {"logits": [s.tolist() for s in splits], "tokens": tokens.tolist(),
            "tp_allreduce": route}


def _bcast(t: torch.Tensor | None, shape: tuple[int, int], src: int) -> torch.Tensor:
    buf = t if t is not None else torch.empty(shape, dtype=torch.float32, device=groups.device())
    dist.broadcast(buf, src=src)
    return buf.cpu()


def hf_reference(model_path: str, prompts: list[list[int]], max_new: int) -> dict:
    """Teacher-forced logits and ``generate`` greedy tokens from HF ``transformers``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one checkpoint load, no bar needed
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32,
                                                 use_safetensors=True)
    model.eval()
    logits, tokens = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            logits.append(model(ids).logits[0].float().tolist())
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=False,
                max_new_tokens=max_new, min_new_tokens=0, eos_token_id=None, pad_token_id=0,
            )
            tokens.append(out[0, len(p):].tolist())
    return {"logits": logits, "tokens": tokens}


def compare(ours: dict, ref: dict) -> dict:
    """Max abs logit difference and exact token agreement."""
    diff = max(
        (torch.tensor(a) - torch.tensor(b)).abs().max().item()
        for a, b in zip(ours["logits"], ref["logits"])
    )
    same = ours["tokens"] == ref["tokens"]
    return {"max_abs_logit_diff": diff, "tokens_match": same}


def check_logprobs_close(ours: list, ref: list) -> None:
    """vLLM's closeness rule for half precision, per prompt ``(tokens, [logprobs per step])``:
    identical greedy tokens, or at the first divergence each side's token is among the
    other's top-k logprobs (later tokens are not compared).

    Raises:
        AssertionError: naming the prompt and position that break the rule.
    """
    for i, ((tok_a, lp_a), (tok_b, lp_b)) in enumerate(zip(ours, ref)):
        if len(tok_a) != len(tok_b):
            raise AssertionError(f"prompt {i}: {len(tok_a)} tokens vs {len(tok_b)}")
        for pos, (a, b) in enumerate(zip(tok_a, tok_b)):
            if a != b:
                top_a = {int(t) for t in lp_a[pos]}
                top_b = {int(t) for t in lp_b[pos]}
                if b not in top_a:
                    raise AssertionError(f"prompt {i} pos {pos}: reference {b} not in ours "
                                         f"{top_a}")
                if a not in top_b:
                    raise AssertionError(f"prompt {i} pos {pos}: our {a} not in reference "
                                         f"{top_b}")
                break


def hf_greedy_logprobs(model, prompts: list[list[int]], max_new: int, top: int = 5
                       ) -> list[tuple[list[int], list[dict]]]:
    """HF ``generate`` greedy tokens and the ``top`` logprobs at each step, for a loaded
    ``transformers`` model (in its own dtype and device)."""
    out = []
    dev = next(model.parameters()).device
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=dev)
            g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=max_new, eos_token_id=None, pad_token_id=0,
                               output_logits=True, return_dict_in_generate=True)
            tops = []
            for logits in g.logits:
                t = torch.log_softmax(logits[0].float(), -1).topk(top)
                tops.append(dict(zip(t.indices.tolist(), t.values.tolist())))
            out.append((g.sequences[0, len(p):].tolist(), tops))
    return out


def tokenize_prompts(model_path: str, texts: list[str]) -> list[list[int]]:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        raise SeesawError(f"no usable tokenizer in {model_path}; pass --prompt-ids") from None
    return [tok(t)["input_ids"] for t in texts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="seesaw_mcore parity check against HF")
    ap.add_argument("--model", required=True, nargs="+", help="one or more HF model folders")
    ap.add_argument("--layouts", nargs="+", default=["T1"])
    ap.add_argument("--prompt-ids", help="JSON list of token-id lists (default: tokenize "
                    "built-in sample prompts)")
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--out", help="rank 0 writes the JSON report here")
    ap.add_argument("--check", action="store_true", help="compare with HF and print a verdict")
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args(argv)
    reports, ok = {}, True
    try:
        cfgs = [ModelConfig.from_pretrained(m) for m in args.model]
        layouts = [ParallelConfig.parse(s) for s in args.layouts]
        rank, world = groups.init_distributed()
        for lay in layouts:
            for cfg in cfgs:
                cfg.check_layout(lay)
            check_world(lay, world)
        for path, cfg in zip(args.model, cfgs):
            prompts = (json.loads(args.prompt_ids) if args.prompt_ids
                       else tokenize_prompts(path, DEFAULT_PROMPTS))
            dtype = resolve_dtype(args.dtype, cfg)
            report = {"prompts": prompts, "layouts": {}}
            for lay in layouts:
                report["layouts"][str(lay)] = run_layout(cfg, lay, prompts, args.max_new, dtype)
            reports[path] = report
            if rank == 0 and args.check:
                ok &= _print_verdicts(args, path, report)
    except SeesawError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump(reports, f)
    groups.shutdown()
    return 0 if ok else 1


def _print_verdicts(args, path: str, report: dict) -> bool:
    prompts = report["prompts"]
    ref = hf_reference(path, prompts, args.max_new)
    ok = True
    print(f"parity vs HF transformers on {path} ({len(prompts)} prompts, "
          f"{args.max_new} greedy tokens each)")
    for name, res in report["layouts"].items():
        c = compare(res, ref)
        good = c["tokens_match"] and c["max_abs_logit_diff"] < args.tol
        ok &= good
        print(f"  {name:>6}: max |logit diff| = {c['max_abs_logit_diff']:.2e}, greedy tokens "
              f"{'identical' if c['tokens_match'] else 'DIFFER'} -> {'OK' if good else 'FAIL'}")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        first = next(iter(report["layouts"].values()))
        for p, t in zip(prompts[:2], first["tokens"][:2]):
            print(f"  sample: {tok.decode(p)!r} -> {tok.decode(t)!r}")
    except (OSError, ValueError):
        pass
    return ok


if __name__ == "__main__":
    sys.exit(main())
