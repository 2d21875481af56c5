"""LoRA job run by test_lora.py under the launcher: ``MODEL OUT ADAPTERS PLANS...``; for
each plan, greedy tokens under each adapter, the base model and a batch mixing them, the
prefix cache's hits across adapters, an adapter-only ``update_weights``, and the error
lines of bad adapters. Rank 0 writes ``{plan: report}`` as JSON."""

from __future__ import annotations

import json
import os
import sys

import torch

from seesaw_mcore import LLM, LoRARequest, SamplingParams, SeesawError
from tests.distributed.engine_job import MAX_TOKENS, PROMPTS

PREFIX = list(range(20, 52))  # 8 blocks of 4 tokens


def tokens(outs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outs]


def run(path: str, adapters: str, plan: str) -> dict:
    kw = {"host_kv_tokens": 64} if ":" in plan else {}  # small: several switches per call
    llm = LLM(path, plan=plan, dtype="float32", num_blocks=64, block_size=4, enable_lora=True,
              max_loras=2, max_lora_rank=8, **kw)
    sp = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    req = {n: LoRARequest(n, i, os.path.join(adapters, n)) for i, n in enumerate("abc", 1)}

    def gen(lora, ps=prompts):
        return llm.generate(ps, sp, use_tqdm=False, lora_request=lora)

    rep = {"base": tokens(gen(None)), "a": tokens(gen(req["a"])), "b": tokens(gen(req["b"]))}
    mixed = [req["a"], None, req["b"], req["a"], None, req["b"]]
    rep["mixed"] = tokens(gen(mixed))
    rep["waves"] = tokens(gen([req["a"], req["b"], req["c"]] * 2))  # 3 adapters, max_loras 2
    shared = [{"prompt_token_ids": PREFIX + [i, i + 1]} for i in (1, 5)]
    cached = {}
    for name, lora in (("a", req["a"]), ("b_after_a", req["b"]), ("b_again", req["b"]),
                       ("base_after_b", None)):
        outs = gen(lora, shared)
        cached[name] = [o.num_cached_tokens for o in outs]
        rep.setdefault("shared", {})[name] = tokens(outs)
    rep["cached"] = cached
    # adapter-only sync: "a" takes "c"'s tensors by their PEFT names
    from safetensors.torch import load_file

    c_tensors = load_file(os.path.join(adapters, "c", "adapter_model.safetensors"))
    llm.update_weights(sorted(c_tensors.items()), lora_name="a")
    rep["a_updated_to_c"] = tokens(gen(req["a"]))
    rep["c"] = tokens(gen(req["c"]))  # loaded from its folder (evicts "b", the LRU one)
    rep["switches"] = llm.engine.stats.switches
    rep["errors"] = errors(llm, adapters, req, sp)
    rep["still_works"] = tokens(gen(mixed))
    llm.close()
    return rep


def errors(llm, adapters: str, req: dict, sp) -> list[str]:
    got = []
    bad = [LoRARequest("big", 7, os.path.join(adapters, "big")),
           LoRARequest("gone", 8, os.path.join(adapters, "no_such_adapter")),
           LoRARequest("other", 9, os.path.join(adapters, "other")),
           LoRARequest("head", 10, os.path.join(adapters, "head")),
           [req["a"]] * 5]
    for lora in bad:
        try:
            llm.generate([{"prompt_token_ids": p} for p in PROMPTS], sp, use_tqdm=False,
                         lora_request=lora)
            got.append("no error")
        except SeesawError as e:
            got.append(str(e))
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for name, value, lora_name in (
            ("base_model.model.model.layers.9.mlp.gate_proj.lora_A.weight", [1.0], "c"),
            (q_a, [[1.0, 2.0]], "c"), (q_a, [[1.0]], "nope")):
        try:
            llm.update_weights([(name, torch.tensor(value))], lora_name=lora_name)
            got.append("no error")
        except SeesawError as e:
            got.append(str(e))
    return got


def main() -> None:
    path, out, adapters, *plans = sys.argv[1:]
    report = {plan: run(path, adapters, plan) for plan in plans}
    import torch.distributed as dist

    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
