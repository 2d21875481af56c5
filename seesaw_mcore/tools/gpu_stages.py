"""The stages of the GPU check (``tools/gpu_check.py`` runs each in its own process, in order,
and says what each proves); each takes ``(device, scratch folder, quick)`` and returns its
JSON-able result or raises."""

from __future__ import annotations

import os
import random
import shutil
import time

import torch


def _sync(dev: torch.device) -> None:
    from seesaw_mcore.runtime import groups

    groups.accelerator().synchronize()


def _timed(fn, dev: torch.device, repeats: int) -> float:
    fn()
    _sync(dev)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        best = min(best, time.perf_counter() - t0)
    return best


def interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run the kernel here (``None``: it can, or it is not
    asked for): Triton 3.6's interpreter turns 1-element arrays into ints, which numpy >= 2.3
    refuses (the device image holds both; on its GPU the kernel is compiled instead)."""
    from seesaw_mcore import env

    if not env.triton_interpret():
        return None
    import numpy as np
    import triton

    def version(v: str) -> tuple[int, int]:
        return tuple(int(x) for x in v.split(".")[:2])  # type: ignore[return-value]

    if version(triton.__version__) <= (3, 6) and version(np.__version__) >= (2, 3):
        return (f"skipped: Triton {triton.__version__}'s interpreter cannot run under numpy "
                f"{np.__version__} (>= 2.3); the test suite runs the kernel interpreted (its "
                f"own Triton) and a GPU compiles it")
    return None


def _interpreted() -> bool:
    from seesaw_mcore import env

    return env.triton_interpret() and interpreter_problem() is None


def _attend(q, k, v, kc, vc, meta):
    """The step's attention as the engine runs it on this device; on a CPU under
    ``TRITON_INTERPRET=1``, the Triton kernel itself (the device image's Triton)."""
    from seesaw_mcore.model.attention import paged_attention, write_kv

    if q.device.type == "cpu" and _interpreted():
        from seesaw_mcore.model.triton_attention import paged_attention_triton

        write_kv(k, v, kc, vc, meta)
        return paged_attention_triton(q, kc, vc, meta)
    return paged_attention(q, k, v, kc, vc, meta)


def kernel_check(dev: torch.device, root: str, quick: bool) -> dict:
    """Kernel vs float64 reference (bf16 and fp32; small mixed shapes and real ones), and
    its decode time vs padded SDPA."""
    import torch.nn.functional as F

    from seesaw_mcore.model.attention import (
        AttentionMetadata,
        random_paged_case,
        reference_attention,
    )

    res: dict = {"path": "triton" if dev.type == "cuda" or _interpreted() else "cpu"}
    if dev.type == "cpu" and interpreter_problem():
        res["triton_interpreter"] = interpreter_problem()
    g = torch.Generator().manual_seed(1)
    cases = {"": (16, 8, 2, 64, [1, 1, 9, 1, 33, 1], [17, 64, 9, 200, 80, 1],
                  (torch.float32, torch.bfloat16)),
             "real_shapes_": (16, 32, 4, 128, [1, 37, 1, 1],
                              [520, 600, 130, 1] if quick else [4097, 4130, 4500, 130],
                              (torch.bfloat16,))}
    for prefix, (bs, hq, hkv, d, qlens, ctx, dtypes) in cases.items():
        for dtype in dtypes:
            q, kc, vc, tables = random_paged_case(qlens, ctx, heads=hq, kv_heads=hkv,
                                                  head_dim=d, block_size=bs, dtype=dtype)
            q, kc, vc = q.to(dev), kc.to(dev), vc.to(dev)
            t = sum(qlens)
            k = torch.randn(t, hkv, d, generator=g).to(dtype).to(dev)
            v = torch.randn(t, hkv, d, generator=g).to(dtype).to(dev)
            meta = AttentionMetadata.build(qlens, ctx, tables, bs, dev)
            out = _attend(q, k, v, kc, vc, meta)
            ref = reference_attention(q.cpu(), kc.cpu(), vc.cpu(), qlens, ctx, tables)
            err = float((out.double().cpu() - ref).abs().max())
            res[f"{prefix}max_abs_err" if prefix else f"max_abs_err_{str(dtype)[6:]}"] = err
    if res["path"] == "triton":  # split-context decode (flash-decoding), forced
        from seesaw_mcore.model.triton_attention import paged_attention_triton

        qlens, ctx = [1, 1, 1], [1500 if not quick else 300, 65, 700 if not quick else 40]
        q, kc, vc, tables = random_paged_case(qlens, ctx, heads=32, kv_heads=8, head_dim=128,
                                              block_size=16, dtype=torch.bfloat16)
        meta = AttentionMetadata.build(qlens, ctx, tables, 16, dev)
        out = paged_attention_triton(q.to(dev), kc.to(dev), vc.to(dev), meta, splits=4)
        ref = reference_attention(q, kc, vc, qlens, ctx, tables)
        res["split_decode_max_abs_err"] = float((out.double().cpu() - ref).abs().max())
    # decode timing: B sequences, contexts up to L, bf16
    bs, hq, hkv, d = 16, 32, 8, 128
    b, length = (4, 64) if quick else (64, 2048)
    lens = [random.Random(i).randint(length // 4, length) for i in range(b)]
    per = -(-length // bs)
    kc = torch.randn(b * per, bs, hkv, d, dtype=torch.bfloat16, device=dev)
    vc = torch.randn_like(kc)
    tables = [list(range(i * per, (i + 1) * per)) for i in range(b)]
    q = torch.randn(b, hq, d, dtype=torch.bfloat16, device=dev)
    k1 = torch.randn(b, hkv, d, dtype=torch.bfloat16, device=dev)
    meta = AttentionMetadata.build([1] * b, lens, tables, bs, dev)
    keys = kc.view(b, per * bs, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]: dense, padded
    vals = vc.view(b, per * bs, hkv, d).transpose(1, 2)
    mask = torch.arange(per * bs, device=dev)[None] < torch.tensor(lens, device=dev)[:, None]
    mask = mask[:, None, None, :]  # [B, 1, 1, L]
    reps = 2 if quick else 50
    res["decode_batch"], res["decode_max_context"] = b, length
    res["kernel_ms"] = 1e3 * _timed(lambda: _attend(q, k1, k1, kc, vc, meta), dev, reps)
    res["dense_sdpa_ms"] = 1e3 * _timed(lambda: F.scaled_dot_product_attention(
        q[:, :, None], keys, vals, attn_mask=mask, enable_gqa=True), dev, reps)
    return res


def closeness_check(dev: torch.device, root: str, quick: bool) -> dict:
    """Engine bf16 vs HF bf16 on the device (vLLM's rule), T1."""
    from transformers import AutoModelForCausalLM

    from seesaw_mcore import LLM, SamplingParams
    from seesaw_mcore.bench.models import build_random
    from seesaw_mcore.tools.parity import check_logprobs_close, hf_greedy_logprobs

    path = build_random(os.path.join(root, "close"), num_layers=4, hidden=256, heads=8,
                        kv_heads=4, intermediate=512, vocab=1000, init_std=0.15, seed=5)
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(3, 1000) for _ in range(rng.randint(4, 60))]
               for _ in range(8)]
    max_new = 8 if quick else 32
    llm = LLM(path, dtype="bfloat16")  # on a GPU: the KV cache sized by the profiling run
    kv_blocks = sum(llm.engine.num_blocks.values())
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True,
                                       logprobs=5), use_tqdm=False)
    llm.close()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                              use_safetensors=True).to(dev)
    ref = hf_greedy_logprobs(hf, prompts, max_new)
    ours = [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]
    exact = sum(a[0] == b[0] for a, b in zip(ours, ref))
    try:
        check_logprobs_close(ours, ref)
        verdict = "ok"
    except AssertionError as e:
        verdict = f"FAIL: {e}"
    return {"prompts": len(prompts), "tokens": max_new, "identical": exact, "close": verdict,
            "kv_blocks": kv_blocks}


def throughput_check(dev: torch.device, root: str, quick: bool) -> dict:
    """Engine (CUDA graphs, then eager) vs HF ``generate`` tokens/s on the same device,
    model and prompts (bf16)."""
    from transformers import AutoModelForCausalLM

    from seesaw_mcore import LLM, SamplingParams
    from seesaw_mcore.bench.hf import hf_generate_timed
    from seesaw_mcore.bench.models import build_random

    dims = (dict(num_layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=2000)
            if quick else dict(num_layers=22, hidden=2048, heads=32, kv_heads=4,
                               intermediate=5632, vocab=32000))  # TinyLlama-1.1B's shape
    path = build_random(os.path.join(root, "speed"), init_std=0.02, max_positions=2048, **dims)
    n, max_new = (8, 8) if quick else (256, 128)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, dims["vocab"]) for _ in range(rng.randint(32, 512))]
               for _ in range(n)]
    sp = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    res: dict = {"prompts": n, "prompt_len": [32, 512], "max_tokens": max_new}
    tokens, runs = {}, {}
    probe = [{"prompt_token_ids": p} for p in prompts[:8]]
    probe_sp = SamplingParams(temperature=0, max_tokens=4 if quick else 32, ignore_eos=True,
                              logprobs=5)
    for eager in (False, True):
        llm = LLM(path, dtype="bfloat16", enforce_eager=eager)
        llm.generate(inputs[:2], sp, use_tqdm=False)  # warm-up
        st0 = (llm.engine.stats.decode_s, llm.engine.stats.decode_steps)
        t0 = time.perf_counter()
        outs = llm.generate(inputs, sp, use_tqdm=False)
        _sync(dev)
        took = time.perf_counter() - t0
        st = llm.engine.stats
        steps = st.decode_steps - st0[1]
        tag = "eager" if eager else "graphs"
        res[f"engine_{tag}_tok_s"] = round(n * max_new / took, 1)
        res[f"engine_{tag}_decode_ms_per_step"] = round(
            1e3 * (st.decode_s - st0[0]) / max(steps, 1), 2)
        res[f"engine_{tag}_decode_steps"] = steps
        res[f"engine_{tag}_graph_steps"] = llm.engine.executor.runner.graph_steps
        res["kv_blocks"] = sum(llm.engine.num_blocks.values())
        tokens[eager] = [o.outputs[0].token_ids for o in outs]
        runs[eager] = [(o.outputs[0].token_ids, o.outputs[0].logprobs)
                       for o in llm.generate(probe, probe_sp, use_tqdm=False)]
        llm.close()
    res.update(graphs_verdict(runs[False], runs[True]))
    res["graphs_same_tokens"] = tokens[False] == tokens[True]  # information: near-ties flip
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                              use_safetensors=True).to(dev).eval()
    res["model_params_m"] = round(sum(p.numel() for p in hf.parameters()) / 1e6, 1)
    hf_generate_timed(hf, prompts[:2], 2, 2, device=dev)  # warm-up
    hf_s = hf_generate_timed(hf, prompts, max_new, 64, device=dev)
    del hf
    res.update(hf_batch=64, hf_tok_s=round(n * max_new / hf_s, 1))
    res["ratio_graphs_vs_hf"] = round(res["engine_graphs_tok_s"] / res["hf_tok_s"], 2)
    res["ratio_graphs_vs_eager"] = round(res["engine_graphs_tok_s"]
                                         / res["engine_eager_tok_s"], 2)
    return res


def graphs_verdict(graphs: list, eager: list) -> dict:
    """CUDA graphs vs eager by vLLM's closeness rule (``check_logprobs_close``) over
    ``(tokens, logprobs)`` per prompt; identical sequences counted as information (a
    random-weight model's top logits may tie, and another cuBLAS algorithm under capture
    flips a near-tie without anything being wrong)."""
    from seesaw_mcore.tools.parity import check_logprobs_close

    try:
        check_logprobs_close(graphs, eager)
        close = "ok"
    except AssertionError as e:
        close = f"FAIL: {e}"
    return {"graphs_close": close,
            "graphs_identical": f"{sum(a[0] == b[0] for a, b in zip(graphs, eager))}"
                                f"/{len(graphs)}"}


def versions(dev: torch.device, root: str, quick: bool) -> dict:
    """What the image holds (the versions a first run depends on)."""
    import importlib.metadata as md
    import platform

    out = {"python": platform.python_version(),
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev)}
    for name in ("torch", "triton", "transformers", "typing-extensions", "deepspeed",
                 "megatron-core", "hydra-core", "numpy", "safetensors"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


SHM_MIN = 16 * 2**20  # the smallest host-tier copy worth timing


def host_copy_check(dev: torch.device, root: str, quick: bool) -> dict:
    """GB/s host -> device and back from pinned, pageable and registered shared memory;
    the shared buffer takes at most half of ``/dev/shm``'s free space (skipped below
    ``SHM_MIN``)."""
    from seesaw_mcore.kv.host_tier import HostKVBuffer

    free = shutil.disk_usage("/dev/shm").free
    n = min((16 if quick else 1024) * 2**20, free // 2 // 2**20 * 2**20)  # bytes
    if n < SHM_MIN:
        return {"skipped": f"/dev/shm has {free / 2**20:.0f} MiB free; timing the host "
                           f"tier's copies needs {2 * SHM_MIN // 2**20} MiB"}
    res: dict = {"bytes": n, "shm_free": free}
    shm = HostKVBuffer(f"seesaw_gpu_check_{os.getpid()}", (1, 1, 1, n // 2, 1), torch.bfloat16,
                       create=True)
    try:
        sources = {"pageable": torch.empty(n, dtype=torch.uint8),
                   "shm_registered" if shm.registered else "shm": shm.tensor.view(-1).view(
                       torch.uint8)}
        if dev.type == "cuda":
            sources["pinned"] = torch.empty(n, dtype=torch.uint8).pin_memory()
        target = torch.empty(n, dtype=torch.uint8, device=dev)
        reps = 2 if quick else 10
        for name, host in sources.items():
            h2d = _timed(lambda h=host: target.copy_(h, non_blocking=True), dev, reps)
            d2h = _timed(lambda h=host: h.copy_(target, non_blocking=True), dev, reps)
            res[name] = {"h2d_gb_s": round(n / h2d / 1e9, 2), "d2h_gb_s": round(n / d2h / 1e9, 2)}
    finally:
        shm.close()
    return res


def switch_check(dev: torch.device, root: str, quick: bool) -> dict:
    """One GPU: why no switch runs, and the weight copy a switch makes, timed."""
    from seesaw_mcore.runtime import groups

    res = {"switch": "not run: a Seesaw plan needs two ranks on two devices and this machine "
                     "has %d" % (groups.accelerator().device_count()
                                 if dev.type == "cuda" else 1)}
    n = (8 if quick else 2048) * 2**20  # bytes of a layout's shard on one rank
    host = torch.empty(n, dtype=torch.uint8)
    host = host.pin_memory() if dev.type == "cuda" else host
    target = torch.empty(n, dtype=torch.uint8, device=dev)
    s = _timed(lambda: target.copy_(host, non_blocking=True), dev, 2 if quick else 5)
    res.update(weight_bytes=n, weight_copy_ms=round(1e3 * s, 2),
               weight_copy_gb_s=round(n / s / 1e9, 2))
    return res


def ops_check(dev: torch.device, root: str, quick: bool) -> list:
    """Ops per decode step at batch 4 and 64 (``bench.step.per_step``)."""
    from seesaw_mcore import LLM
    from seesaw_mcore.bench.step import per_step

    llm = LLM(os.path.join(os.path.dirname(__file__), "..", "..", "models", "tiny-llama"),
              dtype="bfloat16" if dev.type == "cuda" else "float32")
    try:
        return [per_step(llm, b, False, 2, 6, 16, 2048, repeats=1) for b in (4, 64)]
    finally:
        llm.close()
