"""Shared-prefix ("cascade") attention for CPU ranks: when every sequence of a step reads the
same leading KV blocks (a few-shot prefix, the n samples of a prompt - prefix caching makes
them the same blocks), those keys are read once for all the step's queries, as two batched
GEMMs per KV head, instead of once per sequence; each sequence's own blocks go through the
paged kernel, and the two parts merge by their log-sum-exps (FlashInfer's cascade, vLLM's
cascade attention). Decode over a long shared prefix is bound by reading it, so this divides
that traffic by the batch size.
"""

from __future__ import annotations

import numpy as np
import torch

from seesaw_mcore.model import cpu_attention

# Used when a step has at least this many sequences sharing at least this many tokens.
MIN_SEQS = 8
MIN_TOKENS = 256


def common_prefix_blocks(tables: np.ndarray, query_lens: np.ndarray, context_lens: np.ndarray,
                         block_size: int) -> int:
    """Leading blocks every row of the padded ``[B, NBmax]`` block table shares, all of them
    cached context every query of the step sees (0 below ``MIN_SEQS`` / ``MIN_TOKENS``).

    The rows' blocks past their own tables are padding (0), so a shared run is cut to the
    shortest cached context of the step."""
    b = tables.shape[0]
    if b < MIN_SEQS:
        return 0
    cached = int((context_lens - query_lens).min()) // block_size  # full blocks all have
    if cached * block_size < MIN_TOKENS:
        return 0
    same = (tables[:, :cached] == tables[:1, :cached]).all(axis=0)  # [cached]
    n = int(same.argmin()) if not same.all() else cached
    return n if n * block_size >= MIN_TOKENS else 0


def cascade_attention_cpu(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          meta) -> torch.Tensor:
    """Attention of the step's queries over the shared prefix (``meta.common_blocks``) and
    each sequence's own blocks, merged.

    Args:
        q: ``[T, Hq, D]`` queries; k_cache / v_cache: ``[NB, BS, Hkv, D]``.
        meta: the step's ``AttentionMetadata`` (``common_blocks`` > 0).

    Returns:
        ``[T, Hq, D]`` in ``q``'s dtype.
    """
    part = meta._cpu.get("cascade")
    if part is None:  # per step, built by the first layer
        nb, bs = meta.common_blocks, meta.block_size
        part = (meta.block_tables[0, :nb].long(), meta.block_tables[:, nb:].contiguous(),
                meta.seq_lens - nb * bs)
        meta._cpu["cascade"] = part
    blocks, own_tables, own_lens = part
    t, hq, d = q.shape
    hkv = k_cache.shape[2]
    g = hq // hkv
    keys = k_cache.index_select(0, blocks).view(-1, hkv, d).float()  # [P, Hkv, D]
    vals = v_cache.index_select(0, blocks).view(-1, hkv, d).float()  # [P, Hkv, D]
    qh = q.float().view(t, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, t * g, d)  # [Hkv, TG, D]
    s = torch.bmm(qh, keys.permute(1, 2, 0)).mul_(d ** -0.5)  # [Hkv, TG, P]
    m = s.amax(dim=-1, keepdim=True)  # [Hkv, TG, 1]
    e = s.sub_(m).exp_()
    total = e.sum(dim=-1, keepdim=True)  # [Hkv, TG, 1]
    o_pre = torch.bmm(e, vals.transpose(0, 1)).div_(total)  # [Hkv, TG, D]
    lse_pre = (m + total.log()).view(hkv, t, g).permute(1, 0, 2).reshape(t, hq)  # [T, Hq]
    o_pre = o_pre.view(hkv, t, g, d).permute(1, 0, 2, 3).reshape(t, hq, d)  # [T, Hq, D]
    o_own, lse_own = cpu_attention.paged_attention_lse_cpu(
        q, k_cache, v_cache, own_tables, meta.cu_query_lens, own_lens)  # [T, Hq, D], [T, Hq]
    top = torch.maximum(lse_pre, lse_own)
    w_pre, w_own = (lse_pre - top).exp_(), (lse_own - top).exp_()  # [T, Hq]
    out = o_pre.mul_(w_pre.unsqueeze(-1)).add_(o_own.float() * w_own.unsqueeze(-1))
    return out.div_((w_pre + w_own).unsqueeze(-1)).to(q.dtype)
