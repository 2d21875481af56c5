"""One step's attention metadata: how the flat token batch maps onto sequences and paged
cache rows (shared by the CPU paths in ``attention.py`` and the Triton kernel)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from seesaw_mcore import h2d
from seesaw_mcore.model.cascade import common_prefix_blocks


@dataclass
class AttentionMetadata:
    """How one step's flat token batch maps onto sequences and cache rows.

    Built once per step by the model runner and shared by every layer of the stage.
    """

    query_lens: np.ndarray  # [B] new tokens per sequence (prompt in prefill, 1 in decode)
    context_lens: np.ndarray  # [B] tokens in each sequence's cache after this step
    positions: torch.Tensor  # [T] position of each new token in its sequence
    cache_rows: torch.Tensor  # [T] flat cache row (block * block_size + offset)
    block_tables: torch.Tensor  # [B, max_blocks] int32 block ids (0-padded)
    cu_query_lens: torch.Tensor  # [B + 1] int32 start of each sequence's queries in [T]
    seq_lens: torch.Tensor  # [B] int32 context lengths (device copy of ``context_lens``)
    block_size: int
    fresh: bool  # every sequence is a fresh prefill: its K/V are all this step's
    decode: bool  # every sequence feeds one token
    common_blocks: int = 0  # leading blocks every sequence shares (cascade attention, CPU)
    invariant: bool = False  # batch-invariant mode: every query through the paged kernel
    _cpu: dict = field(default_factory=dict, repr=False)  # per-step CPU index tensors

    @property
    def max_query_len(self) -> int:
        return int(self.query_lens.max())

    @classmethod
    def build(
        cls,
        query_lens: list[int] | np.ndarray,
        context_lens: list[int] | np.ndarray,
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
        width: int | None = None,
        invariant: bool = False,
    ) -> "AttentionMetadata":
        """Computes positions, cache rows and the padded block table as flat tensors.

        Args:
            query_lens: new tokens per sequence.
            context_lens: total tokens per sequence after this step (>= query_lens).
            block_tables: block ids per sequence, enough for ``context_lens``.
            block_size: tokens per block.
            device: where the tensors live.
            width: block-table columns (default: the longest table's; CUDA graphs pad to a
                fixed width).
            invariant: batch-invariant mode (``model/invariant.py``): no SDPA prefill, no
                cascade.
        """
        q = np.asarray(query_lens, dtype=np.int64)  # [B]
        c = np.asarray(context_lens, dtype=np.int64)  # [B]
        lens = np.fromiter(map(len, block_tables), np.int64, len(block_tables))  # [B]
        width = max(int(lens.max()), width or 0)
        tables = np.zeros((len(block_tables), width), dtype=np.int64)  # [B, NBmax]
        # every row's blocks in one fill (row-major order is the tables' order)
        tables[np.arange(width) < lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(block_tables), np.int64, int(lens.sum()))
        cu = np.zeros(len(q) + 1, dtype=np.int64)
        np.cumsum(q, out=cu[1:])
        seq = np.repeat(np.arange(len(q)), q)  # [T] sequence of each token
        pos = np.arange(cu[-1]) - cu[:-1][seq] + (c - q)[seq]  # [T]
        rows = tables[seq, pos // block_size] * block_size + pos % block_size  # [T]
        ints = np.concatenate([pos, rows, cu, c, tables.ravel()])
        flat = h2d.to_device(torch.from_numpy(ints), device)  # one host -> device copy
        t = len(pos)
        parts = flat.split([t, t, len(cu), len(c), tables.size])
        return cls(q, c, parts[0], parts[1], parts[4].view(tables.shape).int(),
                   parts[2].int(), parts[3].int(), block_size, bool((q == c).all()),
                   bool((q == 1).all()),
                   common_prefix_blocks(tables, q, c, block_size)
                   if device.type == "cpu" and not invariant else 0, invariant)
