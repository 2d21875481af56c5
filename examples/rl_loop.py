"""An RL-style loop on one engine: generate n samples per prompt, the engine sleeps (its
memory back to the trainer) while a training step changes the weights, wakes and takes them
in place (no restart, no re-sharding from disk), repeat.

    deepspeed --no_local_rank --num_gpus 2 examples/rl_loop.py --plan P2:T2
    python examples/rl_loop.py                     # one rank

The "trainer" here is a stand-in: it holds the model's full tensors under their HF names (as a
trainer hands them over after gathering its shards) and nudges the MLP weights each step. In
a real loop the pairs come from the trainer's ``named_parameters()`` (or, from trainer
processes, through ``init_weight_update_group`` + ``update_weights_from_distributed``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from seesaw_mcore import LLM, SamplingParams  # noqa: E402

PROMPTS = ["Return the number of", "This module provides a", "Create a new", "Convert"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/tiny-llama")
    ap.add_argument("--plan", default="T1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt (a GRPO group)")
    ap.add_argument("--sleep-level", type=int, default=2, choices=(0, 1, 2),
                    help="free the engine's memory while training (0: do not)")
    args = ap.parse_args()
    llm = LLM(args.model, plan=args.plan)
    weights = load_file(os.path.join(args.model, "model.safetensors"))  # the trainer's copy
    for step in range(args.rounds):
        params = SamplingParams(n=args.n, temperature=1.0, seed=step, max_tokens=16)
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
        if args.sleep_level:  # KV cache and device weights freed (level 2: host copies too)
            llm.sleep(args.sleep_level)
        g = torch.Generator().manual_seed(step)  # the same "training" on every rank
        for name, t in weights.items():  # stand-in for an optimizer step
            if ".mlp." in name:
                t.add_(1e-2 * torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype))
        t0 = time.perf_counter()
        if args.sleep_level:
            llm.wake_up(["weights"])  # weights first, then the KV cache: never both at once
        llm.update_weights(weights.items())  # after a level-2 sleep: every parameter
        if args.sleep_level:
            llm.wake_up(["kv_cache"])
        took = time.perf_counter() - t0
        if llm.is_driver:
            lengths = [len(c.token_ids) for o in outs for c in o.outputs]
            print(f"step {step}: {len(lengths)} samples, mean length "
                  f"{sum(lengths) / len(lengths):.1f} tokens, e.g. {outs[0].outputs[0].text!r}; "
                  f"woken and updated in {took * 1e3:.0f} ms")
    llm.shutdown()


if __name__ == "__main__":
    main()
