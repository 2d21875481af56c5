"""Paged attention against dense causal attention, through shuffled block tables."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seesaw_mcore.model import attention
from seesaw_mcore.model.attention import AttentionMetadata, paged_attention

HQ, HKV, D, BS, NB = 4, 2, 8, 4, 32


def _dense(q, k, v):  # q [S, Hq, D], k/v [S, Hkv, D], causal over the whole sequence
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                       v.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
    return o[0].transpose(0, 1)


@pytest.mark.parametrize("pad_limit", [0.0, 1e9])  # CPU prefill: per-sequence calls / padded
def test_prefill_then_decode_then_multi_token_through_blocks(monkeypatch, pad_limit):
    monkeypatch.setattr(attention, "PAD_FLOPS_LIMIT", pad_limit)
    g = torch.Generator().manual_seed(0)
    lens = [5, 9, 1]
    perm = torch.randperm(NB, generator=g).tolist()
    tables = [perm[0:4], perm[4:8], perm[8:12]]  # non-contiguous, shuffled blocks
    kc = torch.zeros(NB, BS, HKV, D)
    vc = torch.zeros(NB, BS, HKV, D)
    full = [(torch.randn(n + 4, HQ, D, generator=g), torch.randn(n + 4, HKV, D, generator=g),
             torch.randn(n + 4, HKV, D, generator=g)) for n in lens]

    def step(qlens, ctx):
        q = torch.cat([f[0][c - n:c] for f, n, c in zip(full, qlens, ctx)])
        k = torch.cat([f[1][c - n:c] for f, n, c in zip(full, qlens, ctx)])
        v = torch.cat([f[2][c - n:c] for f, n, c in zip(full, qlens, ctx)])
        meta = AttentionMetadata.build(qlens, ctx, tables, BS, torch.device("cpu"))
        out = paged_attention(q, k, v, kc, vc, meta)
        ref = torch.cat([_dense(*(t[:c] for t in f))[c - n:c] for f, n, c in zip(full, qlens, ctx)])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    step(lens, lens)  # fresh prefill (no gather)
    step([1, 1, 1], [n + 1 for n in lens])  # batched decode through the block tables
    # multi-token continuation over cached context
    step([3, 1, 2], [n + 1 + q for n, q in zip(lens, [3, 1, 2])])


def test_cache_rows():
    meta = AttentionMetadata.build([2, 1], [2, 6], [[7], [3, 5]], BS, torch.device("cpu"))
    assert meta.cache_rows.tolist() == [28, 29, 5 * BS + 1]


def test_metadata_is_flat():
    """Positions, slots, the padded block table and cumulative query lengths, per step."""
    meta = AttentionMetadata.build([3, 1], [3, 6], [[7], [3, 5]], BS, torch.device("cpu"))
    assert meta.positions.tolist() == [0, 1, 2, 5]
    assert meta.block_tables.tolist() == [[7, 0], [3, 5]]
    assert meta.cu_query_lens.tolist() == [0, 3, 4]
    assert meta.seq_lens.tolist() == [3, 6]
    assert not meta.fresh and not meta.decode


@pytest.mark.parametrize("head_dim", [8, 64])  # 64: the kernel's compile-time head size
def test_cpu_extension_matches_reference_and_fallback(head_dim):
    """The C++ CPU kernel (decode and multi-token steps over cached context, GQA, mixed
    lengths, shuffled blocks, contexts longer than its prefetch distance; float32, bfloat16
    and float16) against the dense reference and against the gather fallback."""
    from seesaw_mcore.model import cpu_attention
    from seesaw_mcore.model.attention import (
        _context_cpu,
        random_paged_case,
        reference_attention,
    )

    assert cpu_attention.available()
    qlens, ctx = [1, 1, 4, 1, 6], [4, 17, 9, 1, 70]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        q, kc, vc, tables = random_paged_case(qlens, ctx, heads=HQ, kv_heads=HKV,
                                              head_dim=head_dim, block_size=BS, dtype=dtype,
                                              num_blocks=NB, seed=3)
        meta = AttentionMetadata.build(qlens, ctx, tables, BS, torch.device("cpu"))
        out = cpu_attention.paged_attention_cpu(q, kc, vc, meta.block_tables,
                                                meta.cu_query_lens, meta.seq_lens)
        ref = reference_attention(q, kc, vc, qlens, ctx, tables)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(out, _context_cpu(q, kc, vc, meta), rtol=tol, atol=tol)


@pytest.mark.parametrize("qlens", [[1] * 9, [1, 3, 1, 1, 2, 1, 1, 4, 1]])
def test_cascade_over_a_shared_prefix_matches_reference(qlens):
    """Nine sequences whose tables start with the same 20 blocks of 16 (a few-shot prefix
    under prefix caching): the step takes the cascade path, and it matches the dense
    reference (decode, and steps of a few tokens each) in float32 and bfloat16, and the
    plain paged kernel."""
    from seesaw_mcore.model import cascade, cpu_attention
    from seesaw_mcore.model.attention import random_paged_case, reference_attention

    bs, shared = 16, 20
    own = [1, 3, 2, 5, 1, 4, 2, 3, 6]  # own blocks after the prefix
    ctx = [(shared + n) * bs - 5 for n in own]
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        q, kc, vc, tables = random_paged_case(qlens, [c - (shared * bs) for c in ctx],
                                              heads=6, kv_heads=2, head_dim=64,
                                              block_size=bs, dtype=dtype,
                                              num_blocks=shared + sum(own), seed=5)
        used = {b for t in tables for b in t}
        prefix = [b for b in range(shared + sum(own)) if b not in used]  # the shared blocks
        assert len(prefix) == shared
        tables = [prefix + t for t in tables]
        meta = AttentionMetadata.build(qlens, ctx, tables, bs, torch.device("cpu"))
        assert meta.common_blocks == shared
        out = cascade.cascade_attention_cpu(q, kc, vc, meta)
        ref = reference_attention(q, kc, vc, qlens, ctx, tables)
        torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        plain = cpu_attention.paged_attention_cpu(q, kc, vc, meta.block_tables,
                                                  meta.cu_query_lens, meta.seq_lens)
        torch.testing.assert_close(out, plain, rtol=tol, atol=tol)
    few = AttentionMetadata.build([1] * 7, ctx[:7], tables[:7], bs, torch.device("cpu"))
    assert few.common_blocks == 0  # below MIN_SEQS: the plain kernel
