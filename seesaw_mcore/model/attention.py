"""Paged attention on PyTorch SDPA.

The device KV cache is split into fixed-size blocks; each sequence owns a block table. New
keys/values are scattered into their slots, then attention gathers the sequence's context
through its block table. Prefill of fresh sequences attends to its own new K/V directly
(causal SDPA per sequence); decode batches every sequence into one padded SDPA call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    """How one step's flat token batch maps onto sequences and cache slots.

    Built once per step by the model runner and shared by every layer of the stage.
    """

    query_lens: list[int]  # new tokens per sequence (prompt length in prefill, 1 in decode)
    context_lens: list[int]  # tokens in each sequence's cache after this step
    slot_mapping: torch.Tensor  # [T] flat cache slot (block * block_size + offset) per new token
    gather_slots: torch.Tensor | None  # [B, max_ctx] slots to read per sequence (non-fresh seqs)
    gather_mask: torch.Tensor | None  # [B, 1, Q, max_ctx] bool, True = attend

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def all_fresh(self) -> bool:
        """Every sequence is a prefill from position 0: no cached context to read."""
        return all(q == c for q, c in zip(self.query_lens, self.context_lens))

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> "AttentionMetadata":
        """Computes slot indices for writes and, for non-fresh batches, padded gathers.

        Args:
            query_lens: new tokens per sequence.
            context_lens: total tokens per sequence after this step (>= query_lens).
            block_tables: block ids per sequence, enough for ``context_lens``.
            block_size: tokens per block.
            device: where the index tensors live.
        """
        slots: list[int] = []
        for q, c, table in zip(query_lens, context_lens, block_tables):
            for pos in range(c - q, c):
                slots.append(table[pos // block_size] * block_size + pos % block_size)
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=device)  # [T]
        gather_slots = gather_mask = None
        if any(q != c for q, c in zip(query_lens, context_lens)):
            max_ctx, max_q = max(context_lens), max(query_lens)
            b = len(query_lens)
            pos = torch.arange(max_ctx)  # [C]
            gs = torch.zeros(b, max_ctx, dtype=torch.long)  # [B, C]
            mask = torch.zeros(b, 1, max_q, max_ctx, dtype=torch.bool)  # [B, 1, Q, C]
            for i, (q, c, table) in enumerate(zip(query_lens, context_lens, block_tables)):
                blocks = torch.tensor(table, dtype=torch.long)
                p = pos[:c]
                gs[i, :c] = blocks[p // block_size] * block_size + p % block_size
                qpos = torch.arange(c - q, c).unsqueeze(1)  # [q, 1]
                mask[i, 0, :q, :c] = p.unsqueeze(0) <= qpos
                mask[i, 0, q:, 0] = True  # padded query rows attend somewhere (no NaN)
            gather_slots, gather_mask = gs.to(device), mask.to(device)
        return cls(list(query_lens), list(context_lens), slot_mapping, gather_slots, gather_mask)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """Writes new K/V into the cache and attends.

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
    hkv, d = k.shape[1], k.shape[2]
    k_flat = k_cache.view(-1, hkv, d)  # [slots, Hkv, D]
    v_flat = v_cache.view(-1, hkv, d)  # [slots, Hkv, D]
    k_flat.index_copy_(0, meta.slot_mapping, k)
    v_flat.index_copy_(0, meta.slot_mapping, v)
    if meta.gather_slots is None:
        return _fresh_prefill(q, k, v, meta.query_lens)
    kc = k_flat[meta.gather_slots].transpose(1, 2)  # [B, Hkv, C, D]
    vc = v_flat[meta.gather_slots].transpose(1, 2)  # [B, Hkv, C, D]
    qb = _pad_queries(q, meta.query_lens)  # [B, Hq, Q, D]
    out = F.scaled_dot_product_attention(qb, kc, vc, attn_mask=meta.gather_mask, enable_gqa=True)
    return _unpad(out, meta.query_lens)  # [T, Hq, D]


def _fresh_prefill(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_lens: list[int]
) -> torch.Tensor:
    out = torch.empty_like(q)  # [T, Hq, D]
    start = 0
    for n in query_lens:
        sl = slice(start, start + n)
        o = F.scaled_dot_product_attention(
            q[sl].transpose(0, 1).unsqueeze(0),  # [1, Hq, n, D]
            k[sl].transpose(0, 1).unsqueeze(0),  # [1, Hkv, n, D]
            v[sl].transpose(0, 1).unsqueeze(0),
            is_causal=True,
            enable_gqa=True,
        )
        out[sl] = o[0].transpose(0, 1)
        start += n
    return out


def _pad_queries(q: torch.Tensor, query_lens: list[int]) -> torch.Tensor:
    if all(n == 1 for n in query_lens):
        return q.unsqueeze(2)  # [B, Hq, 1, D]
    b, max_q = len(query_lens), max(query_lens)
    qb = q.new_zeros(b, max_q, q.shape[1], q.shape[2])  # [B, Q, Hq, D]
    start = 0
    for i, n in enumerate(query_lens):
        qb[i, :n] = q[start : start + n]
        start += n
    return qb.transpose(1, 2)  # [B, Hq, Q, D]


def _unpad(out: torch.Tensor, query_lens: list[int]) -> torch.Tensor:
    if all(n == 1 for n in query_lens):
        return out[:, :, 0]  # [B, Hq, D]
    out = out.transpose(1, 2)  # [B, Q, Hq, D]
    return torch.cat([out[i, :n] for i, n in enumerate(query_lens)], dim=0)  # [T, Hq, D]
