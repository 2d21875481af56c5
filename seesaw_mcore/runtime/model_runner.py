"""Batch tensors -> pipeline forward (send/recv between stages) -> logits.

Every rank calls ``forward`` with the same step description; each runs its own stage.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from seesaw_mcore.config import ModelConfig, ParallelConfig, split_layers
from seesaw_mcore.engine.outputs import RunnerOutput, SampledToken, SchedulerOutput
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model.attention import AttentionMetadata
from seesaw_mcore.model.llama import LlamaStage
from seesaw_mcore.model.loader import Checkpoint, ShardSpec, load_shard
from seesaw_mcore.runtime import groups
from seesaw_mcore.runtime.sampler import sample

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, cfg: ModelConfig) -> torch.dtype:
    """``auto`` -> float32 on CPU ranks (fast, exact), the checkpoint's dtype on GPUs."""
    if name == "auto":
        if groups.device().type == "cpu":
            return torch.float32
        return _DTYPES.get(cfg.torch_dtype, torch.bfloat16)
    if name not in _DTYPES:
        raise SeesawError(f"dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def kv_bytes_per_block(
    cfg: ModelConfig, layout: ParallelConfig, block_size: int, dtype: torch.dtype
) -> int:
    """KV bytes one block costs on the rank with the most layers (first stage)."""
    start, end = split_layers(cfg.num_layers, layout.pp)[0]
    hkv = cfg.num_kv_heads // layout.tp
    return 2 * (end - start) * block_size * hkv * cfg.head_dim * dtype.itemsize


class ModelRunner:
    """Holds this rank's stage and its paged KV cache for one layout.

    Args:
        cfg: model architecture.
        layout: the parallel layout to run.
        dtype: parameter and KV dtype.
        num_blocks: paged KV cache blocks per layer; ``None``: call ``allocate_kv`` later
            (after the weights are on the device, so free memory can size the cache).
        block_size: tokens per block.
        ckpt: an opened checkpoint (opened here when omitted).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layout: ParallelConfig,
        dtype: torch.dtype,
        num_blocks: int | None,
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
        self.kv_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        if num_blocks is not None:
            self.allocate_kv(num_blocks)

    def allocate_kv(self, num_blocks: int) -> None:
        """Allocates the paged cache: per local layer, K and V ``[NB, BS, Hkv/TP, D]``."""
        hkv = self.cfg.num_kv_heads // self.info.layout.tp
        shape = (num_blocks, self.block_size, hkv, self.cfg.head_dim)
        self.kv_cache = [
            (torch.zeros(shape, dtype=self.dtype, device=self.device),
             torch.zeros(shape, dtype=self.dtype, device=self.device))
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
        """Runs one batch through every pipeline stage and returns chosen logits.

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
        sends: list = []
        hidden = self._stage(input_ids, positions, query_lens, context_lens, block_tables, sends)
        for work, _buf in sends:
            work.wait()
        if hidden is None:
            return None
        idx = torch.tensor(logits_indices, dtype=torch.long, device=self.device)
        return self.model.logits(hidden[idx])  # [N, V]

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> RunnerOutput | None:
        """Runs a scheduled step; micro-batches flow through the stages back to back, so
        stage ``s`` computes micro-batch ``m`` while stage ``s+1`` computes ``m-1``.

        Returns:
            The sampled tokens on the last stage's TP rank 0, ``None`` on other ranks.
        """
        sends: list = []
        sampled: list[SampledToken] = []
        for mb in step.micro_batches:
            ids = [t for s in mb for t in s.token_ids]
            qlens = [len(s.token_ids) for s in mb]
            ctx = [s.start_pos + len(s.token_ids) for s in mb]
            pos = [p for s in mb for p in range(s.start_pos, s.start_pos + len(s.token_ids))]
            hidden = self._stage(ids, pos, qlens, ctx, [s.block_table for s in mb], sends)
            if hidden is None:
                continue
            last = torch.tensor(qlens, device=self.device).cumsum(0) - 1  # [B]
            logits = self.model.logits(hidden[last])  # [B, V]
            if self.info.tp_rank == 0:
                sampled += sample(logits, [s.seq_id for s in mb], [s.sampling for s in mb])
        for work, _buf in sends:
            work.wait()
        if self.info.is_last_stage and self.info.tp_rank == 0:
            return RunnerOutput(sampled)
        return None

    def _stage(self, input_ids, positions, query_lens, context_lens, block_tables, sends):
        """This rank's stage on one micro-batch; returns hidden ``[T, H]`` on the last stage,
        else queues an async send of it to the next stage and returns ``None``."""
        info, dev = self.info, self.device
        meta = AttentionMetadata.build(query_lens, context_lens, block_tables, self.block_size, dev)
        pos = torch.tensor(positions, dtype=torch.long, device=dev)  # [T]
        if info.is_first_stage:
            x = torch.tensor(input_ids, dtype=torch.long, device=dev)  # [T]
        else:
            x = torch.empty(len(input_ids), self.cfg.hidden_size, dtype=self.dtype, device=dev)
            dist.recv(x, src=info.prev_rank)  # [T, H]
        hidden = self.model(x, pos, self.kv_cache, meta)  # [T, H]
        if info.is_last_stage:
            return hidden
        hidden = hidden.contiguous()
        sends.append((dist.isend(hidden, dst=info.next_rank), hidden))
        return None

    def last_stage_rank(self) -> int:
        """Global rank of TP rank 0 of the last stage in this rank's DP replica."""
        lay = self.info.layout
        return lay.rank_of(self.info.dp_rank, 0, lay.pp - 1)
