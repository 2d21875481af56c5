"""GPU KV sizing on CPU ranks, run by test_gpu_paths.py under the launcher: the engine's
device memory is a fake that behaves like CUDA's caching allocator (live tensors count as
allocated; freed memory stays reserved, so the driver sees it as used, until
``empty_cache``), with a fixed CUDA context and a scripted activation peak. Several engines
are built one after another in one process. Rank 0 writes JSON."""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist

from seesaw_mcore import LLM, SamplingParams
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.runtime import memory
from seesaw_mcore.runtime.memory import kv_bytes_per_block

MIB = 2**20
TOTAL, CONTEXT, ACTIVATIONS = 512 * MIB, 32 * MIB, 8 * MIB


def _live_bytes() -> int:
    """Bytes of every live tensor storage in this process (each storage once)."""
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
            try:
                st = obj.untyped_storage()
            except (RuntimeError, NotImplementedError):
                continue
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class FakeCudaMemory:
    """A device whose 'allocations' are this process's tensors since it was made."""

    def __init__(self) -> None:
        self.base = _live_bytes()
        self.reserved = 0
        self._at_reset = 0
        self.profiles = 0  # reset_peak calls: one per profiled layout

    def allocated(self) -> int:
        now = max(_live_bytes() - self.base, 0)
        self.reserved = max(self.reserved, now)  # the caching allocator keeps what it got
        return now

    def total(self) -> int:
        return TOTAL

    def free(self) -> int:
        self.allocated()
        return TOTAL - CONTEXT - self.reserved

    def peak(self) -> int:
        return max(self._at_reset, self.allocated()) + ACTIVATIONS

    def reset_peak(self) -> None:
        self.profiles += 1
        self._at_reset = self.allocated()

    def empty_cache(self) -> None:
        self.reserved = 0
        self.allocated()


def main(model: str, out: str) -> None:
    fake = FakeCudaMemory()
    memory.device_memory = lambda: fake  # the engine's sizing reads the fake
    report: dict = {}
    kw = dict(plan="P2:T2", block_size=4, gpu_memory_utilization=0.5, max_num_seqs=8,
              max_prefill_tokens=64, host_kv_tokens=256)
    prompts = [{"prompt_token_ids": list(range(5, 5 + 7 * (i + 1)))} for i in range(6)]
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    for i in range(2):  # two engines, one after the other
        llm = LLM(model, **kw)
        eng = llm.engine
        prof = eng.memory_profile
        budgets = [None] * dist.get_world_size()
        dist.all_gather_object(budgets, prof.budget)
        bpb = {str(lay): kv_bytes_per_block(eng.model_cfg, lay, 4, eng.dtype)
               for lay in eng.num_blocks}
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        report[f"engine{i}"] = dict(
            blocks={str(k): v for k, v in eng.num_blocks.items()}, bpb=bpb,
            min_budget=min(budgets), activations=prof.activations, used=prof.used,
            extra=prof.extra_weights, profiles=fake.profiles,
            tokens=[o.outputs[0].token_ids for o in outs] if llm.is_driver else None)
        llm.close()
        report[f"engine{i}"]["reserved_after_close"] = fake.reserved
        del llm, eng
        gc.collect()
    try:
        LLM(model, **{**kw, "gpu_memory_utilization": 0.01})
        report["small"] = "built"
    except SeesawError as e:
        report["small"] = str(e)
    gc.collect()
    before = fake.profiles
    llm = LLM(model, **{**kw, "kv_cache_gib": 1 / 1024})  # explicit: honoured, not profiled
    report["explicit"] = dict(blocks={str(k): v for k, v in llm.engine.num_blocks.items()},
                              profiled=fake.profiles - before,
                              profile=llm.engine.memory_profile is not None)
    llm.close()
    ref = LLM(model, **{**kw, "num_blocks": 64})  # the same tokens from a configured cache
    outs = ref.generate(prompts, greedy, use_tqdm=False)  # every rank runs it
    report["reference"] = [o.outputs[0].token_ids for o in outs]
    # Decode padded to CUDA-graph buckets (eager on CPU): the batch shrinks 6 -> 1 through
    # buckets 8, 4, 2, 1; tokens and logprobs as unpadded, under T2 and P2 -> T2.
    varied = [SamplingParams(temperature=0, max_tokens=3 + 2 * i, ignore_eos=True, logprobs=2)
              for i in range(len(prompts))]
    for plan in ("T2", "P2:T2"):
        ref.close()
        runs = {}
        for padded in (False, True):
            os.environ["SEESAW_DECODE_PADDING"] = "1" if padded else "0"
            ref = LLM(model, **{**kw, "num_blocks": 64, "plan": plan})
            outs = ref.generate(prompts, varied, use_tqdm=False)
            runs[padded] = dict(
                steps=ref.engine.executor.runner.graph_steps,
                tokens=[o.outputs[0].token_ids for o in outs],
                logprobs=[[lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                           o.outputs[0].token_ids)]
                          for o in outs])
            if padded:
                ref.close()
                ref = LLM(model, **{**kw, "num_blocks": 64, "plan": plan,
                                    "enforce_eager": True})
                ref.generate(prompts[:2], greedy, use_tqdm=False)
                runs["eager_steps"] = ref.engine.executor.runner.graph_steps
        report[f"padded_{plan}"] = runs
    os.environ.pop("SEESAW_DECODE_PADDING")
    if ref.is_driver:
        with open(out, "w") as f:
            json.dump(report, f)
    ref.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:3])
