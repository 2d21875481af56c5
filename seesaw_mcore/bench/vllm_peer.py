"""A persistent generation worker for ``bench_vllm``: vLLM (run with the vLLM environment's
Python) or this engine (run with ours, one rank or several under the launcher).

    <vllm-env>/bin/python seesaw_mcore/bench/vllm_peer.py vllm WORKDIR MODEL
    deepspeed --no_local_rank --num_gpus 2 seesaw_mcore/bench/vllm_peer.py engine WORKDIR MODEL D2

It loads the model once, writes ``WORKDIR/NAME.ready``, then for each ``WORKDIR/NAME.go.I``
the driver writes, generates greedily for every prompt in ``WORKDIR/prompts.json`` and writes
``WORKDIR/NAME.done.I`` (seconds and tokens); ``WORKDIR/NAME.stop`` ends it. Files keep the
two engines in separate processes and environments while the driver interleaves their runs.
This file imports neither package at module level, so either environment can run it.
"""

from __future__ import annotations

import json
import os
import sys
import time


def _wait(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.02)


def _serve(work: str, name: str, generate, is_driver: bool, barrier=lambda: None) -> None:
    """Runs ``generate(prompts, max_tokens) -> token lists`` whenever the driver asks."""
    with open(os.path.join(work, "prompts.json")) as f:
        job = json.load(f)
    prompts, max_tokens = job["prompts"], job["max_tokens"]
    generate(prompts[:2], 4)  # warm-up (vLLM also compiles at start)
    if is_driver:
        open(os.path.join(work, f"{name}.ready"), "w").close()
    i = 0
    while True:
        go, stop = os.path.join(work, f"{name}.go.{i}"), os.path.join(work, f"{name}.stop")
        while not (os.path.exists(go) or os.path.exists(stop)):
            time.sleep(0.02)
        barrier()
        if os.path.exists(stop):
            return
        t0 = time.perf_counter()
        tokens = generate(prompts, max_tokens)
        seconds = time.perf_counter() - t0
        if is_driver:
            tmp = os.path.join(work, f"{name}.done.{i}.tmp")
            with open(tmp, "w") as f:
                json.dump({"seconds": seconds, "tokens": tokens}, f)
            os.replace(tmp, os.path.join(work, f"{name}.done.{i}"))
        i += 1


def serve_vllm(work: str, model: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # no prefix caching: this engine has none, and the rounds repeat the same prompts
    llm = LLM(model=model, dtype="float32", skip_tokenizer_init=True, seed=0,
              max_model_len=1024, enable_prefix_caching=False)

    def generate(prompts, max_tokens):
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp,
                            use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]

    _serve(work, "vllm", generate, True)


def serve_engine(work: str, model: str, plan: str) -> None:
    import torch.distributed as dist

    from seesaw_mcore import LLM, SamplingParams

    prefill, _, decode = plan.partition(":")
    llm = LLM(model, prefill=prefill, decode=decode or None, dtype="float32",
              kv_cache_gib=1.0)

    def generate(prompts, max_tokens):
        sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs]

    _serve(work, f"engine-{plan}", generate, llm.is_driver, dist.barrier)
    llm.shutdown()


if __name__ == "__main__":
    kind, work, model = sys.argv[1:4]
    if kind == "vllm":
        serve_vllm(work, model)
    else:
        serve_engine(work, model, sys.argv[4])
