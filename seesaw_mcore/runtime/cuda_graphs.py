"""CUDA graphs for decode steps, as vLLM captures them.

A decode step's forward is dozens of small kernels per layer; at small batches their launch
cost, not the GPU, sets the step time. Per batch-size bucket (``capture_sizes``), the stage's
decode forward (embedding, every layer with its paged-attention kernel and TP all-reduces,
the final norm) is captured once into a CUDA graph over static input buffers; a step is
padded up to its bucket (``pad_decode``: padding rows are one-token sequences whose KV goes to
a reserved null block) and replayed. As in vLLM V1, logits and the sampler run eagerly after
the replay (they read the real rows only).

A graph is captured per bucket and context class (``context_class``: the step's longest
context rounded up to a power of two), so split-context decode inside a graph is chosen for
contexts like the step's, not for the block table's full width; each sequence's keys are then
split by its own length inside the kernel.

Graphs are captured lazily, the first time a bucket is needed under a stage, and dropped when
the stage or the KV buffer changes (a Seesaw switch rebuilds the stage: the decode layout
captures again after it). Pipeline-parallel decode layouts run eagerly (their stage-to-stage
sends stay outside graphs), and so does everything on CPU ranks, where ``DecodeGraphs`` still
pads (``capture=False``) so the padding path is tested there. A capture that fails falls back to
eager with one warning. ``enforce_eager=True`` (vLLM's meaning) turns graphs off.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from seesaw_mcore.model.attention import AttentionMetadata

MAX_CAPTURE = 512  # vLLM's default largest captured batch


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, then every multiple of 8 (vLLM's list), up to
    ``max_num_seqs`` (itself included) and at most ``MAX_CAPTURE``."""
    top = min(max_num_seqs, MAX_CAPTURE)
    sizes = [s for s in [1, 2, 4, *range(8, MAX_CAPTURE + 1, 8)] if s < top]
    return [*sizes, top]


def context_class(max_context: int, cap: int) -> int:
    """The longest context a graph is captured for: ``max_context`` rounded up to a power of
    two (at least 512), at most ``cap`` (the block table's width in tokens)."""
    c = 512
    while c < max_context:
        c *= 2
    return min(c, cap)


def bucket(n: int, sizes: list[int]) -> int | None:
    """The smallest captured size holding ``n`` rows (``None``: larger than every one)."""
    for s in sizes:
        if s >= n:
            return s
    return None


def pad_decode(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
               size: int, null_block: int) -> tuple[list[int], list[int], list[list[int]]]:
    """A decode step padded to ``size`` rows: each padding row is a one-token sequence at
    position 0 whose KV is written to (and read from) ``null_block`` only."""
    pad = size - len(query_lens)
    if pad < 0:
        raise ValueError(f"{len(query_lens)} rows do not fit a bucket of {size}")
    return ([*query_lens, *[1] * pad], [*context_lens, *[1] * pad],
            [*block_tables, *[[null_block]] * pad])


@dataclass
class _Captured:
    graph: object
    ids: torch.Tensor  # [S] input token ids (first stage) or [S, H] hidden states
    meta: AttentionMetadata  # static tensors the graph reads
    out: torch.Tensor  # [S, H] the stage's output


class DecodeGraphs:
    """Decode forwards of one stage over one KV buffer, per bucket (see the module doc).

    Args:
        model: the stage (``LlamaStage``), called as ``model(x, positions, kv, meta)``.
        kv_cache: the stage's per-layer KV views.
        sizes: the buckets (``capture_sizes``).
        table_width: block-table columns of every padded step (the longest sequence's
            blocks), so one graph serves every context length.
        null_block: a block no sequence owns (padding rows write there).
        block_size: tokens per block.
        capture: capture and replay graphs (CUDA); False pads and runs eagerly (CPU tests).
    """

    def __init__(self, model, kv_cache, sizes: list[int], table_width: int, null_block: int,
                 block_size: int, capture: bool) -> None:
        self.model, self.kv_cache, self.sizes = model, kv_cache, sizes
        self.width, self.null_block, self.block_size = table_width, null_block, block_size
        self.capture = capture
        self.graphs: dict[tuple[int, int], _Captured] = {}  # (bucket, context class)
        self._pool = None

    def forward(self, x: torch.Tensor, query_lens: list[int], context_lens: list[int],
                block_tables: list[list[int]]) -> tuple[torch.Tensor, AttentionMetadata]:
        """The stage's output ``[B, H]`` for a decode step of ``B`` sequences (``x``: ``[B]``
        ids or ``[B, H]`` hidden states), run padded to its bucket, and the padded step's
        metadata (its first ``B`` rows are the step's)."""
        n = len(query_lens)
        size = bucket(n, self.sizes)
        q, c, tables = pad_decode(query_lens, context_lens, block_tables, size,
                                  self.null_block)
        meta = AttentionMetadata.build(q, c, tables, self.block_size, x.device,
                                       width=self.width)
        xs = torch.cat([x, x.new_zeros((size - n, *x.shape[1:]))]) if size > n else x
        if not self.capture:
            return self.model(xs, meta.positions, self.kv_cache, meta)[:n], meta
        key = (size, context_class(max(context_lens), self.width * self.block_size))
        cap = self.graphs.get(key) or self._capture(key, xs, meta)
        if cap is None:  # capture failed: eager from now on
            return self.model(xs, meta.positions, self.kv_cache, meta)[:n], meta
        cap.ids.copy_(xs, non_blocking=True)
        for name in ("positions", "cache_rows", "block_tables", "cu_query_lens", "seq_lens"):
            getattr(cap.meta, name).copy_(getattr(meta, name), non_blocking=True)
        from seesaw_mcore.runtime import groups

        groups.accelerator().replay_graph(cap.graph)
        return cap.out[:n], meta

    def _capture(self, key: tuple[int, int], xs: torch.Tensor, meta: AttentionMetadata
                 ) -> _Captured | None:
        from seesaw_mcore.runtime import groups

        acc = groups.accelerator()
        try:
            static = _static_meta(meta, key[1])
            ids = xs.clone()
            stream = acc.Stream()
            stream.wait_stream(acc.current_stream())
            with acc.stream(stream):  # warm-up outside the graph (allocator, autotuning)
                for _ in range(2):
                    self.model(ids, static.positions, self.kv_cache, static)
            acc.current_stream().wait_stream(stream)
            graph = acc.create_graph()
            with acc.capture_to_graph(graph, pool=self._pool):
                out = self.model(ids, static.positions, self.kv_cache, static)
            self._pool = graph.pool()
            cap = _Captured(graph, ids, static, out)
        except Exception as e:  # noqa: BLE001 - one warning, then eager
            print(f"warning: CUDA graph capture failed at batch {key[0]} ({type(e).__name__}: "
                  f"{e}); decode runs eagerly", file=sys.stderr)
            self.capture = False
            return None
        self.graphs[key] = cap
        return cap


def _static_meta(meta: AttentionMetadata, max_context: int) -> AttentionMetadata:
    """Owned copies of ``meta``'s tensors for a graph to read; host-side lengths are the
    bucket's rows at its context class's longest context (nothing reads them inside the
    forward but launch settings: split-context decode's splits)."""
    return AttentionMetadata(
        np.ones(len(meta.query_lens), dtype=np.int64),
        np.full(len(meta.context_lens), max_context, dtype=np.int64),
        meta.positions.clone(), meta.cache_rows.clone(), meta.block_tables.clone(),
        meta.cu_query_lens.clone(), meta.seq_lens.clone(), meta.block_size, fresh=False,
        decode=True)
