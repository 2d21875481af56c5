"""Paged attention as one Triton kernel launch per layer (the CUDA path).

Each program takes one tile of ``BLOCK_M`` rows, one KV head and one sequence (grid axes 0, 1,
2: tiles on the axis without CUDA's 65,535 limit, so a 131k-token prompt at GQA 8 still
launches), where a row is a (query token, query head of that KV head's GQA group) pair; it
walks the sequence's context ``BLOCK_N`` tokens at a time, reading K/V blocks in place through
the block table, with an online softmax in float32. Causal within the context: the query at
position ``p`` sees keys ``0..p``. Decode (one query per sequence) and prefill (many) are the
same kernel. A tile past its sequence's queries (the grid is sized for the step's longest)
exits at once. Tile sizes and warps follow the head size and the step's longest query
(``_tiles``); the block table's width is not specialised on, so steps of new widths do not
recompile.

Triton ships with PyTorch's CUDA build, so nothing here is pinned to a CUDA version. The
kernel's code runs on CPU under ``TRITON_INTERPRET=1`` (the test suite does so against a
dense reference).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from seesaw_mcore import env

if TYPE_CHECKING:
    from seesaw_mcore.model.attention_metadata import AttentionMetadata


@triton.jit(do_not_specialize=["stride_bt", "stride_qt", "stride_ot"])
def _paged_attn_kernel(
    Q, K, V, Out, TABLES, CU_Q, SEQ_LENS, scale,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_ot, stride_oh, stride_bt,
    PART_ACC, PART_ML,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    SPLITS: tl.constexpr,
):
    tile = tl.program_id(0) // SPLITS
    split = tl.program_id(0) % SPLITS
    kvh = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    if tile * BLOCK_M >= q_len * GROUP:  # past this sequence's queries: nothing to do
        return
    ctx = tl.load(SEQ_LENS + seq)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # [M]
    tok = rows // GROUP  # query token of each row
    head = kvh * GROUP + rows % GROUP  # query head of each row
    row_ok = tok < q_len
    qpos = ctx - q_len + tok  # [M] position of each row's query
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(Q + (q_start + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None],
                mask=row_ok[:, None] & d_ok[None], other=0.0)  # [M, D]
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    last_tok = tl.minimum(q_len, (tile + 1) * BLOCK_M // GROUP + 1)
    hi = ctx - q_len + last_tok  # keys this tile can see: positions < hi
    lo = 0
    if SPLITS > 1:  # split-context decode: this program takes one chunk of its own keys
        chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(hi, lo + chunk)
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)  # [N] key positions
        n_ok = n < hi
        blk = tl.load(TABLES + seq * stride_bt + n // PAGE, mask=n_ok, other=0).to(tl.int64)
        kv_off = blk * stride_kb + (n % PAGE) * stride_ks + kvh * stride_kh  # [N]
        kv_mask = n_ok[:, None] & d_ok[None]
        k = tl.load(K + kv_off[:, None] + d[None], mask=kv_mask, other=0.0)  # [N, D]
        v = tl.load(V + kv_off[:, None] + d[None], mask=kv_mask, other=0.0)  # [N, D]
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)),
                       input_precision="ieee")  # [M, N]
        else:
            s = tl.dot(q, tl.trans(k))  # [M, N], float32 accumulation
        s = s * scale
        seen = (n[None] <= qpos[:, None]) & n_ok[None] & row_ok[:, None]
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])  # [M, N]
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if SPLITS > 1:  # partial softmax state, merged by log-sum-exp after the launch
        part = ((q_start + tok) * (GROUP * tl.num_programs(1)) + head) * SPLITS + split  # [M]
        tl.store(PART_ACC + part[:, None] * BLOCK_D + d[None], acc, mask=row_ok[:, None])
        tl.store(PART_ML + part * 2, m_i, mask=row_ok)
        tl.store(PART_ML + part * 2 + 1, l_i, mask=row_ok)
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(Out + (q_start + tok)[:, None] * stride_ot + head[:, None] * stride_oh
                 + d[None], out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None])


def paged_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
    block_m: int | None = None, block_n: int | None = None, splits: int | None = None,
) -> torch.Tensor:
    """Every query of the step against its sequence's cached context, one launch.

    Args:
        q: ``[T, Hq, D]`` queries.
        k_cache: ``[num_blocks, block_size, Hkv, D]`` key blocks (this step's K written).
        v_cache: ``[num_blocks, block_size, Hkv, D]`` value blocks.
        meta: the step's metadata (``cu_query_lens``, ``seq_lens``, ``block_tables``).
        block_m: rows per program (at least 16 for ``tl.dot``); default ``_tiles``'.
        block_n: keys per inner iteration; default ``_tiles``'.
        splits: context chunks per program, merged by log-sum-exp (split-context decode;
            each sequence's own context is cut into equal chunks); default
            ``decode_splits``' for the step's longest context (``meta.context_lens``).

    Returns:
        ``[T, Hq, D]`` attention output in ``q``'s dtype.
    """
    t, hq, d = q.shape
    # float32 inputs: exact (IEEE) dots, no TF32. bfloat16 under TRITON_INTERPRET: the
    # interpreter's bf16 dot is wrong (it reads the bits as another type), so the CPU tests
    # run that dtype's dots in float32; on GPUs bf16 dots use the tensor cores.
    ieee = q.dtype == torch.float32 or (
        q.dtype == torch.bfloat16 and env.triton_interpret())
    _, page, hkv, _ = k_cache.shape
    group = hq // hkv
    if k_cache.stride(3) != 1 or q.stride(2) != 1:
        raise ValueError("paged_attention_triton needs a contiguous head dimension")
    out = torch.empty_like(q)
    b = len(meta.query_lens)
    if b > MAX_GRID_YZ:
        raise ValueError(f"paged_attention_triton: {b} sequences in one step, at most "
                         f"{MAX_GRID_YZ}")
    auto_m, auto_n, warps = _tiles(d, meta.max_query_len * group)
    block_m, block_n = block_m or auto_m, block_n or auto_n
    tiles = triton.cdiv(meta.max_query_len * group, block_m)
    block_d = triton.next_power_of_2(max(d, 16))
    if splits is None:
        sms = (torch.cuda.get_device_properties(q.device).multi_processor_count
               if q.device.type == "cuda" else 0)
        splits = decode_splits(b * hkv * tiles, meta.max_query_len,
                               int(meta.context_lens.max()), sms)
    if splits > 1:
        part_acc = torch.empty(t, hq, splits, block_d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(t, hq, splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_ml = out  # unused
    tables = meta.block_tables
    _paged_attn_kernel[(tiles * splits, hkv, b)](
        q, k_cache, v_cache, out, tables, meta.cu_query_lens, meta.seq_lens, d ** -0.5,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), tables.stride(0), part_acc, part_ml,
        HEAD_DIM=d, GROUP=group, PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, IEEE=ieee, SPLITS=splits, num_warps=warps,
    )
    if splits == 1:
        return out
    m, lsum = part_ml.unbind(-1)  # [T, Hq, S] each
    w = torch.exp(m - m.amax(-1, keepdim=True)) * (lsum > 0)  # [T, Hq, S] (empty chunks: 0)
    merged = (part_acc[..., :d] * w[..., None]).sum(2) / (lsum * w).sum(-1, keepdim=True)
    return merged.to(q.dtype)  # [T, Hq, D]


def decode_splits(programs: int, max_query_len: int, max_context: int, sms: int) -> int:
    """Context chunks per decode program (flash-decoding): when a decode step's programs
    (sequences x KV heads) leave most of the ``sms`` multiprocessors idle and contexts are
    long, each program's keys are split (chunks of at least 512) so the step fills the GPU;
    1 for prefill, short contexts and on CPU (``sms`` 0)."""
    if max_query_len > 1 or max_context < 1024 or programs >= sms:
        return 1
    return max(1, min(16, 2 * sms // programs, max_context // 512))


MAX_GRID_YZ = 65535  # CUDA's limit on grid axes 1 and 2


def _tiles(head_dim: int, max_rows: int) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, num_warps)`` for a head size and the step's most rows per
    (sequence, KV head) (query tokens x GQA group): decode-sized steps take 16-row tiles so
    no program idles on padding; prefill takes 64-row tiles; wide heads take fewer keys per
    iteration (registers) and more warps."""
    block_m = 16 if max_rows <= 16 else (32 if max_rows <= 32 else 64)
    if head_dim <= 64:
        block_n, warps = 64, 4
    elif head_dim <= 128:
        block_n, warps = (64 if block_m <= 32 else 32), 4
    else:
        block_n, warps = 32, 8
    if block_m == 64:
        warps = max(warps, 8 if head_dim > 64 else 4)
    return block_m, block_n, warps
