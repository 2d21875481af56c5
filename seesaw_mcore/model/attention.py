"""Paged attention: one call per layer for the whole step.

The device KV cache is split into fixed-size blocks; each sequence owns a block table. Per
layer, a step's new keys/values are written into their cache rows (one ``index_copy_`` each for K
and V), then every query of the step attends in one call:

- on CUDA, a Triton kernel (``model/triton_attention.py``) reads the K/V blocks in place
  through the block tables, for decode and prefill alike (varlen queries, GQA, causal
  within each sequence's context);
- on CPU, decode (and any step over cached context) is one C++ call reading the blocks in
  place (``model/cpu_attention.py``); where that extension cannot be built, one batched SDPA
  call over the context gathered through the padded block tables. A fresh prefill is one
  SDPA call over the step's K/V padded to the longest prompt; one whose padding would more
  than double the attention FLOPs (very mixed prompt lengths) runs one SDPA call per
  sequence instead: on a CPU those FLOPs cost more than the calls, and prefill steps are few
  and compute-bound.

``AttentionMetadata`` is built once per step from flat arrays (NumPy, no per-sequence tensor)
and shared by every layer of the stage.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from seesaw_mcore.model.attention_metadata import AttentionMetadata
from seesaw_mcore.model.cascade import cascade_attention_cpu

# A CPU prefill is padded into one SDPA call while padded FLOPs <= this x the real ones.
PAD_FLOPS_LIMIT = 2.0


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             meta: AttentionMetadata) -> None:
    """Scatters this step's ``[T, Hkv, D]`` keys and values into their cache rows."""
    hkv, d = k.shape[1], k.shape[2]
    k_cache.view(-1, hkv, d).index_copy_(0, meta.cache_rows, k)
    v_cache.view(-1, hkv, d).index_copy_(0, meta.cache_rows, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Writes new K/V into the cache and attends, one call for the whole step.

    Args:
        q: ``[T, Hq, D]`` queries (RoPE applied).
        k: ``[T, Hkv, D]`` new keys (RoPE applied).
        v: ``[T, Hkv, D]`` new values.
        k_cache: ``[num_blocks, block_size, Hkv, D]`` this layer's key blocks.
        v_cache: ``[num_blocks, block_size, Hkv, D]`` this layer's value blocks.
        meta: the step's metadata.

    Returns:
        ``[T, Hq, D]`` attention output.
    """
    write_kv(k, v, k_cache, v_cache, meta)
    if q.device.type == "cuda":
        from seesaw_mcore.model.triton_attention import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, meta)
    from seesaw_mcore.model import cpu_attention

    if meta.invariant:  # each query's result a function of its own keys only
        return cpu_attention.paged_attention_cpu(q, k_cache, v_cache, meta.block_tables,
                                                 meta.cu_query_lens, meta.seq_lens)
    if meta.fresh:
        return _prefill_cpu(q, k, v, meta)
    if cpu_attention.available():
        if meta.common_blocks:
            return cascade_attention_cpu(q, k_cache, v_cache, meta)
        return cpu_attention.paged_attention_cpu(q, k_cache, v_cache, meta.block_tables,
                                                 meta.cu_query_lens, meta.seq_lens)
    return _context_cpu(q, k_cache, v_cache, meta)


def _padding(meta: AttentionMetadata) -> dict:
    """Per-step CPU index tensors, built by the first layer and reused by the others:
    ``idx`` ``[T]`` each token's row in the padded ``[B * Qmax]`` batch, ``mask``
    ``[B, 1, Qmax, L]`` which keys each padded query sees."""
    cpu = meta._cpu
    if cpu:
        return cpu
    q, c = meta.query_lens, meta.context_lens
    b, qmax = len(q), int(q.max())
    seq = np.repeat(np.arange(b), q)
    cu = np.concatenate([[0], np.cumsum(q)])
    idx = seq * qmax + np.arange(int(cu[-1])) - cu[:-1][seq]  # [T]
    cpu["idx"] = torch.from_numpy(idx)
    keys = qmax if meta.fresh else meta.block_tables.shape[1] * meta.block_size
    qlen = torch.from_numpy(q).view(b, 1, 1, 1)
    ctx = torch.from_numpy(c).view(b, 1, 1, 1)
    row = torch.arange(qmax).view(1, 1, qmax, 1)
    col = torch.arange(keys).view(1, 1, 1, keys)
    # query i of sequence b sits at position ctx - qlen + i and sees keys up to it
    cpu["mask"] = (col <= ctx - qlen + row) & (col < ctx)  # [B, 1, Qmax, L]
    cpu["qmax"] = qmax
    return cpu


def _pad(x: torch.Tensor, idx: torch.Tensor, b: int, qmax: int) -> torch.Tensor:
    """``[T, H, D]`` -> ``[B, H, Qmax, D]`` (zero rows where a sequence is shorter)."""
    out = x.new_zeros(b * qmax, x.shape[1], x.shape[2]).index_copy_(0, idx, x)
    return out.view(b, qmax, x.shape[1], x.shape[2]).transpose(1, 2)


def _unpad(o: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``[B, H, Qmax, D]`` -> ``[T, H, D]``."""
    b, h, qmax, d = o.shape
    return o.transpose(1, 2).reshape(b * qmax, h, d).index_select(0, idx)


def _prefill_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
    """Fresh prefills attend to their own new K/V (causal). Half-precision inputs attend in
    float32, as the decode kernel accumulates and megatron-core's softmax runs: bfloat16
    rollout logprobs move closer to a trainer's ``GPTModel`` forward (max |delta| 0.148 ->
    0.107 on the demo model, ``tools/logprob_gap.py``; HF's is 0.133)."""
    if q.dtype != torch.float32:
        return _prefill_cpu(q.float(), k.float(), v.float(), meta).to(q.dtype)
    lens = meta.query_lens
    if len(lens) == 1 or len(lens) * int(lens.max()) ** 2 > PAD_FLOPS_LIMIT * (lens**2).sum():
        out = torch.empty_like(q)  # [T, Hq, D]
        start = 0
        for n in lens.tolist():
            sl = slice(start, start + n)
            # 4-D inputs: torch's CPU flash kernel (3-D ones fall to the math path, 2.7x
            # slower at n = 200)
            o = F.scaled_dot_product_attention(
                q[sl].transpose(0, 1)[None], k[sl].transpose(0, 1)[None],
                v[sl].transpose(0, 1)[None], is_causal=True, enable_gqa=True)  # [1, Hq, n, D]
            out[sl] = o[0].transpose(0, 1)
            start += n
        return out
    pad = _padding(meta)
    b, qmax, idx = len(lens), pad["qmax"], pad["idx"]
    o = F.scaled_dot_product_attention(_pad(q, idx, b, qmax), _pad(k, idx, b, qmax),
                                       _pad(v, idx, b, qmax), attn_mask=pad["mask"],
                                       enable_gqa=True)  # [B, Hq, Qmax, D]
    return _unpad(o, pad["idx"])


def _context_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 meta: AttentionMetadata) -> torch.Tensor:
    """Queries attend to their sequences' cached context, read through the padded block
    tables in one gather per K and V."""
    pad = _padding(meta)
    b, qmax = len(meta.query_lens), pad["qmax"]
    nb, bs, hkv, d = k_cache.shape
    tables = meta.block_tables.long()  # [B, NBmax]
    keys = k_cache[tables].view(b, -1, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
    vals = v_cache[tables].view(b, -1, hkv, d).transpose(1, 2)  # [B, Hkv, L, D]
    if meta.decode:  # [T = B, Hq, D] -> [B, Hq, 1, D], no padding needed
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, vals,
                                           attn_mask=pad["mask"], enable_gqa=True)
        return o.squeeze(2)
    o = F.scaled_dot_product_attention(_pad(q, pad["idx"], b, qmax), keys, vals,
                                       attn_mask=pad["mask"], enable_gqa=True)
    return _unpad(o, pad["idx"])


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        query_lens: list[int], context_lens: list[int],
                        block_tables: list[list[int]]) -> torch.Tensor:
    """Dense float64 attention of each sequence's queries over its cached context (causal),
    one sequence at a time: the reference the paged paths are checked against.

    Args:
        q: ``[T, Hq, D]`` queries; k_cache / v_cache: ``[NB, BS, Hkv, D]`` with the step's
            K/V already written; the rest as in ``AttentionMetadata.build``.

    Returns:
        ``[T, Hq, D]`` float64.
    """
    hq, d = q.shape[1], q.shape[2]
    hkv = k_cache.shape[2]
    out, start = [], 0
    for n, c, table in zip(query_lens, context_lens, block_tables):
        k = k_cache[table].reshape(-1, hkv, d)[:c].double().repeat_interleave(hq // hkv, 1)
        v = v_cache[table].reshape(-1, hkv, d)[:c].double().repeat_interleave(hq // hkv, 1)
        s = torch.einsum("qhd,khd->hqk", q[start:start + n].double(), k) / d**0.5
        start += n
        seen = torch.arange(c)[None] <= torch.arange(c - n, c)[:, None]  # [n, c]
        out.append(torch.einsum("hqk,khd->qhd", s.masked_fill(~seen, float("-inf")).softmax(-1),
                                v))
    return torch.cat(out)


def random_paged_case(query_lens: list[int], context_lens: list[int], *, heads: int,
                      kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                      num_blocks: int | None = None, seed: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """Random inputs for checking a paged kernel against :func:`reference_attention`: caches
    of ``num_blocks`` (default: just enough) blocks, each sequence's blocks drawn from a
    shuffled order (so tables are scattered), and the step's queries.

    Returns:
        ``(q [T, Hq, D], k_cache [NB, BS, Hkv, D], v_cache, block_tables)``, on the CPU.
    """
    need = [-(-c // block_size) for c in context_lens]
    num_blocks = num_blocks or sum(need)
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, used = [], 0
    for n in need:
        tables.append(order[used:used + n])
        used += n
    q = torch.randn(sum(query_lens), heads, head_dim, generator=g).to(dtype)
    return q, k_cache, v_cache, tables
