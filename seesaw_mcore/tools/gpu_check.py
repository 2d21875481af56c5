"""The prepared GPU check (``make gpu-check``): on one CUDA GPU, in a few minutes,

1. the paged-attention kernel (Triton on CUDA) against a dense float64 reference on random
   paged inputs (mixed lengths, GQA, shuffled blocks), and its time against dense SDPA over
   the same decode batch padded to the longest context;
2. bf16 closeness to HF ``transformers`` run in bf16 on the same GPU (vLLM's
   ``check_logprobs_close``: greedy tokens equal, or at the first divergence each side's
   token in the other's top-5);
3. this engine's tokens/s against HF ``generate`` on the same GPU, prompts and model (a
   random Llama of ~0.3B parameters, bf16, mixed prompt lengths, greedy, EOS ignored);
4. aten ops per decode step at batch 4 and 64 (``bench_step``).

    python -m seesaw_mcore.tools.gpu_check --json gpu_check.json
    python -m seesaw_mcore.tools.gpu_check --quick      # tiny sizes: a smoke run on CPU

It runs on whatever device DeepSpeed's accelerator names (on a CPU the kernel check covers the
batched CPU path; the Triton kernel's CPU test is tests/unit/test_triton_attention.py), so the
CPU test suite runs it with ``--quick``.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import torch

from seesaw_mcore.bench.common import emit


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


def kernel_check(dev: torch.device, quick: bool) -> dict:
    """Kernel vs float64 reference (bf16 and fp32), and its decode time vs padded SDPA."""
    import torch.nn.functional as F

    from seesaw_mcore.model.attention import (
        AttentionMetadata,
        paged_attention,
        random_paged_case,
        reference_attention,
    )

    bs, hq, hkv, d = 16, 8, 2, 64
    qlens, ctx = [1, 1, 9, 1, 33, 1], [17, 64, 9, 200, 80, 1]
    res: dict = {}
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        q, kc, vc, tables = random_paged_case(qlens, ctx, heads=hq, kv_heads=hkv, head_dim=d,
                                              block_size=bs, dtype=dtype)
        q, kc, vc = q.to(dev), kc.to(dev), vc.to(dev)
        t = sum(qlens)
        k = torch.randn(t, hkv, d, generator=g).to(dtype).to(dev)
        v = torch.randn(t, hkv, d, generator=g).to(dtype).to(dev)
        meta = AttentionMetadata.build(qlens, ctx, tables, bs, dev)
        out = paged_attention(q, k, v, kc, vc, meta)
        ref = reference_attention(q.cpu(), kc.cpu(), vc.cpu(), qlens, ctx, tables)
        res[f"max_abs_err_{str(dtype)[6:]}"] = float((out.double().cpu() - ref).abs().max())
    # decode timing: B sequences, contexts up to L, bf16
    b, length = (8, 256) if quick else (64, 2048)
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
    reps = 3 if quick else 50
    res["decode_batch"], res["decode_max_context"] = b, length
    res["kernel_ms"] = 1e3 * _timed(lambda: paged_attention(q, k1, k1, kc, vc, meta), dev, reps)
    res["dense_sdpa_ms"] = 1e3 * _timed(lambda: F.scaled_dot_product_attention(
        q[:, :, None], keys, vals, attn_mask=mask, enable_gqa=True), dev, reps)
    return res


def closeness_check(dev: torch.device, root: str, quick: bool) -> dict:
    """Engine bf16 vs HF bf16 on the device (vLLM's rule), T1."""
    from transformers import AutoModelForCausalLM

    from seesaw_mcore import LLM, SamplingParams
    from seesaw_mcore.tools.make_tiny import build_random
    from seesaw_mcore.tools.parity import check_logprobs_close, hf_greedy_logprobs

    path = build_random(os.path.join(root, "close"), num_layers=4, hidden=256, heads=8,
                        kv_heads=4, intermediate=512, vocab=1000, init_std=0.15, seed=5)
    rng = random.Random(1)
    prompts = [[1] + [rng.randrange(3, 1000) for _ in range(rng.randint(4, 60))]
               for _ in range(8)]
    max_new = 8 if quick else 32
    llm = LLM(path, dtype="bfloat16", kv_cache_gib=0.5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True,
                                       logprobs=5), use_tqdm=False)
    llm.shutdown()
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
    return {"prompts": len(prompts), "tokens": max_new, "identical": exact, "close": verdict}


def throughput_check(dev: torch.device, root: str, quick: bool) -> dict:
    """Engine vs HF ``generate`` tokens/s on the same device, model and prompts (bf16)."""
    from transformers import AutoModelForCausalLM

    from seesaw_mcore import LLM, SamplingParams
    from seesaw_mcore.bench.hf import hf_generate_timed
    from seesaw_mcore.tools.make_tiny import build_random

    dims = (dict(num_layers=2, hidden=128, heads=4, kv_heads=2, intermediate=256, vocab=2000)
            if quick else dict(num_layers=16, hidden=1024, heads=16, kv_heads=8,
                               intermediate=2816, vocab=32000))
    path = build_random(os.path.join(root, "speed"), init_std=0.02, max_positions=2048, **dims)
    n, max_new = (8, 8) if quick else (128, 128)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, dims["vocab"]) for _ in range(rng.randint(32, 512))]
               for _ in range(n)]
    llm = LLM(path, dtype="bfloat16", kv_cache_gib=0.5 if quick else 40)
    sp = SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs[:2], sp, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    llm.generate(inputs, sp, use_tqdm=False)
    _sync(dev)
    engine_s = time.perf_counter() - t0
    st = llm.engine.stats
    decode_s, decode_steps = st.decode_s, st.decode_steps
    llm.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16,
                                              use_safetensors=True).to(dev).eval()
    hf_run = hf_generate_timed(hf, prompts[:2], 2, 2, device=dev)  # warm-up
    hf_run = hf_generate_timed(hf, prompts, max_new, 64, device=dev)
    gen = n * max_new
    return {"model_params_m": round(sum(p.numel() for p in hf.parameters()) / 1e6, 1),
            "prompts": n, "prompt_len": [32, 512], "max_tokens": max_new, "hf_batch": 64,
            "engine_tok_s": round(gen / engine_s, 1), "hf_tok_s": round(gen / hf_run, 1),
            "ratio": round(hf_run / engine_s, 2),
            "engine_decode_steps": decode_steps,
            "engine_decode_ms_per_step": round(1e3 * decode_s / max(decode_steps, 1), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    from seesaw_mcore.runtime import groups

    groups.init_distributed()
    dev = groups.device()
    import triton

    res = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
           "torch": torch.__version__, "triton": triton.__version__}
    root = tempfile.mkdtemp(prefix="gpu_check_")
    t0 = time.perf_counter()
    res["kernel"] = kernel_check(dev, args.quick)
    res["closeness_bf16"] = closeness_check(dev, root, args.quick)
    res["throughput"] = throughput_check(dev, root, args.quick)
    from seesaw_mcore import LLM
    from seesaw_mcore.bench.step import per_step

    llm = LLM(os.path.join(os.path.dirname(__file__), "..", "..", "models", "tiny-llama"),
              dtype="bfloat16" if dev.type == "cuda" else "float32", kv_cache_gib=0.25)
    res["ops_per_decode_step"] = [per_step(llm, b, False, 2, 6, 16, 2048, repeats=1)
                                  for b in (4, 64)]
    llm.shutdown()
    res["seconds"] = round(time.perf_counter() - t0, 1)
    emit(res, args.json)
    ok = (res["closeness_bf16"]["close"] == "ok"
          and res["kernel"]["max_abs_err_float32"] < 1e-4
          and res["kernel"]["max_abs_err_bfloat16"] < 5e-2)
    print("gpu-check:", "OK" if ok else "FAILED", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
