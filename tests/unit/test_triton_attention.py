"""The CUDA path's Triton paged-attention kernel, run on CPU by Triton's interpreter, against a
dense reference: mixed query and context lengths in one launch (decode, prefill, prefill over
cached context), GQA, contexts ending on and across block boundaries, shuffled blocks, and
float32 / bfloat16 / float16."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # conftest sets it before any triton import

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from seesaw_mcore.model.attention import (  # noqa: E402
    AttentionMetadata,
    paged_attention,
    random_paged_case,
    reference_attention,
)
from seesaw_mcore.model.triton_attention import paged_attention_triton  # noqa: E402

BS, NB = 4, 48


def _case(dtype, qlens, ctx, hq, hkv, d, seed=0):
    return random_paged_case(qlens, ctx, heads=hq, kv_heads=hkv, head_dim=d, block_size=BS,
                             dtype=dtype, num_blocks=NB, seed=seed)


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 2, 32), (8, 1, 16), (2, 2, 24)])
def test_mixed_batch_matches_dense(dtype, heads):
    hq, hkv, d = heads
    # decode at a block boundary and across one, a fresh prefill, a prefill over cached
    # context ending mid-block, a one-token sequence
    qlens, ctx = [1, 1, 7, 5, 1, 20], [4, 9, 7, 14, 1, 21]
    q, kc, vc, tables = _case(dtype, qlens, ctx, hq, hkv, d)
    meta = AttentionMetadata.build(qlens, ctx, tables, BS, torch.device("cpu"))
    out = paged_attention_triton(q, kc, vc, meta)
    ref = reference_attention(q, kc, vc, qlens, ctx, tables)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("block_n", [16, 32, 64])
def test_tile_sizes(block_n):
    qlens, ctx = [3, 1, 33], [40, 17, 33]
    q, kc, vc, tables = _case(torch.float32, qlens, ctx, 4, 2, 16, seed=1)
    meta = AttentionMetadata.build(qlens, ctx, tables, BS, torch.device("cpu"))
    out = paged_attention_triton(q, kc, vc, meta, block_n=block_n)
    torch.testing.assert_close(out.double(), reference_attention(q, kc, vc, qlens, ctx, tables),
                               rtol=1e-5, atol=1e-5)


def test_agrees_with_cpu_path():
    """The kernel and the CPU batched path give the same step output (write + attend)."""
    qlens, ctx = [1, 1, 1, 1], [5, 12, 8, 1]
    q, kc, vc, tables = _case(torch.float32, qlens, ctx, 4, 2, 32, seed=2)
    k = torch.randn(4, 2, 32)
    v = torch.randn(4, 2, 32)
    meta = AttentionMetadata.build(qlens, ctx, tables, BS, torch.device("cpu"))
    cpu = paged_attention(q, k, v, kc, vc, meta)  # writes k, v into their slots
    triton_out = paged_attention_triton(q, kc, vc, meta)
    torch.testing.assert_close(triton_out, cpu, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d,hq,hkv,bs,dtype,ctx", [
    (128, 32, 4, 16, torch.float32, [4097, 4130, 130]),   # GQA 8, Llama-3-8B's heads, 4k+
    (64, 8, 8, 32, torch.float32, [1500, 1533, 130]),     # GQA 1
    (128, 16, 4, 32, torch.bfloat16, [1100, 1137, 70]),   # GQA 4, half precision
])
def test_real_shapes_long_contexts(d, hq, hkv, bs, dtype, ctx):
    """Head sizes 64/128, GQA 1-8, blocks of 16/32, contexts past 4k, decode rows beside
    a prefill over cached context (its tiles past the decode rows' one query exit early)."""
    qlens = [1, 37, 1]
    blocks = sum(-(-c // bs) for c in ctx) + 3
    q, kc, vc, tables = random_paged_case(qlens, ctx, heads=hq, kv_heads=hkv, head_dim=d,
                                          block_size=bs, dtype=dtype, num_blocks=blocks,
                                          seed=7)
    meta = AttentionMetadata.build(qlens, ctx, tables, bs, torch.device("cpu"))
    out = paged_attention_triton(q, kc, vc, meta)
    ref = reference_attention(q, kc, vc, qlens, ctx, tables)
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_tiles_follow_head_size_and_rows():
    from seesaw_mcore.model.triton_attention import _tiles

    assert _tiles(128, 8) == (16, 64, 4)  # decode at GQA 8: one 16-row tile
    assert _tiles(128, 8 * 512) == (64, 32, 8)  # prefill
    assert _tiles(64, 1) == (16, 64, 4)
    assert _tiles(256, 4) == (16, 32, 8)


@pytest.mark.parametrize("splits", [2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_context_decode_matches_dense(splits, dtype):
    """Flash-decoding: each decode program's keys in ``splits`` chunks (some empty for the
    short sequences), merged by log-sum-exp."""
    qlens, ctx = [1, 1, 1, 1], [700, 65, 1, 333]
    q, kc, vc, tables = random_paged_case(qlens, ctx, heads=8, kv_heads=2, head_dim=64,
                                          block_size=16, dtype=dtype, seed=3)
    meta = AttentionMetadata.build(qlens, ctx, tables, 16, torch.device("cpu"))
    out = paged_attention_triton(q, kc, vc, meta, splits=splits)
    ref = reference_attention(q, kc, vc, qlens, ctx, tables)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])


def test_decode_splits_only_for_idle_gpus_and_long_contexts():
    from seesaw_mcore.model.triton_attention import decode_splits

    assert decode_splits(4, 1, 8192, sms=0) == 1  # never on CPU
    assert decode_splits(8, 1, 8192, sms=132) == 16  # 2 sequences x 4 KV heads on an H200
    assert decode_splits(32, 1, 2048, sms=132) == 4  # chunks of at least 512 keys
    assert decode_splits(8, 16, 8192, sms=132) == 1  # prefill
    assert decode_splits(8, 1, 1000, sms=132) == 1  # short contexts
    assert decode_splits(256, 1, 8192, sms=132) == 1  # the step fills the GPU already
