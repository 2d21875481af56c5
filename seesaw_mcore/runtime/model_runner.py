"""Batch tensors -> pipeline forward (send/recv between stages) -> logits.

Every rank calls ``forward`` with the same step description; each runs its own stage.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from seesaw_mcore.config import ModelConfig, ParallelConfig
from seesaw_mcore.model.attention import AttentionMetadata
from seesaw_mcore.model.llama import LlamaStage
from seesaw_mcore.model.loader import Checkpoint, ShardSpec, load_shard
from seesaw_mcore.runtime import groups

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, cfg: ModelConfig) -> torch.dtype:
    """``auto`` -> float32 on CPU ranks (fast, exact), the checkpoint's dtype on GPUs."""
    from seesaw_mcore.errors import SeesawError

    if name == "auto":
        if groups.device().type == "cpu":
            return torch.float32
        return _DTYPES.get(cfg.torch_dtype, torch.bfloat16)
    if name not in _DTYPES:
        raise SeesawError(f"dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


class ModelRunner:
    """Holds this rank's stage and its paged KV cache for one layout.

    Args:
        cfg: model architecture.
        layout: the parallel layout to run.
        dtype: parameter and KV dtype.
        num_blocks: paged KV cache blocks per layer.
        block_size: tokens per block.
        ckpt: an opened checkpoint (opened here when omitted).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layout: ParallelConfig,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        ckpt: Checkpoint | None = None,
    ) -> None:
        self.cfg, self.dtype, self.block_size = cfg, dtype, block_size
        cfg.check_layout(layout)
        self.info = groups.activate(layout)
        self.device = groups.device()
        ckpt = ckpt or Checkpoint(cfg)
        spec = ShardSpec(layout.tp, self.info.tp_rank, layout.pp, self.info.pp_rank)
        self.model = LlamaStage(cfg, self.info, dtype)
        self.model.load_shard(load_shard(ckpt, spec, dtype))
        self.model.to(self.device)
        hkv = cfg.num_kv_heads // layout.tp
        shape = (num_blocks, block_size, hkv, cfg.head_dim)  # [NB, BS, Hkv/TP, D]
        self.kv_cache = [
            (torch.zeros(shape, dtype=dtype, device=self.device),
             torch.zeros(shape, dtype=dtype, device=self.device))
            for _ in self.model.layers
        ]

    @torch.inference_mode()
    def forward(
        self,
        input_ids: list[int],
        positions: list[int],
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        logits_indices: list[int],
    ) -> torch.Tensor | None:
        """Runs one step through every pipeline stage.

        Args:
            input_ids: flat new tokens of all sequences ``[T]``.
            positions: their positions ``[T]``.
            query_lens: new tokens per sequence.
            context_lens: cached + new tokens per sequence.
            block_tables: block ids per sequence.
            logits_indices: which of the ``T`` tokens need logits.

        Returns:
            ``[N, vocab]`` float32 logits on the last stage's ranks, ``None`` elsewhere.
        """
        info, dev = self.info, self.device
        meta = AttentionMetadata.build(query_lens, context_lens, block_tables, self.block_size, dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)  # [T]
        if info.is_first_stage:
            x = torch.tensor(input_ids, dtype=torch.long, device=dev)  # [T]
        else:
            x = torch.empty(len(input_ids), self.cfg.hidden_size, dtype=self.dtype, device=dev)
            dist.recv(x, src=info.prev_rank)  # [T, H]
        hidden = self.model(x, pos, self.kv_cache, meta)  # [T, H]
        if not info.is_last_stage:
            dist.send(hidden.contiguous(), dst=info.next_rank)
            return None
        idx = torch.tensor(logits_indices, dtype=torch.long, device=dev)
        return self.model.logits(hidden[idx])  # [N, V]

    def last_stage_rank(self) -> int:
        """Global rank of TP rank 0 of the last stage in this rank's DP replica."""
        lay = self.info.layout
        return lay.rank_of(self.info.dp_rank, 0, lay.pp - 1)
