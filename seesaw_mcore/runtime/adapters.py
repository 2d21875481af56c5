"""The LoRA adapters one rank holds (full tensors, by adapter index) and their cut for the
live stage, made once per layout and adapter set (so a Seesaw switch re-cuts them for the
new layout from the full copies, like the base weights from the host shards)."""

from __future__ import annotations

import torch

from seesaw_mcore.config import ModelConfig, ParallelConfig
from seesaw_mcore.contract import RankInfo
from seesaw_mcore.model.lora import LoRAAdapter
from seesaw_mcore.model.lora_layers import ActiveLoRA, LoRABatch, StageLoRA, stage_lora
from seesaw_mcore.runtime.weights import shard_spec


class RankAdapters:
    """Adapter index (``1..max_loras``) -> adapter, on every rank the same.

    Args:
        cfg: the model.
        max_loras: adapter indices.
        max_rank: the largest rank an adapter may have (the stacked tensors' width).
        dtype: the model's dtype.
        device: this rank's device.
    """

    def __init__(self, cfg: ModelConfig, max_loras: int, max_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.cfg, self.max_loras, self.max_rank = cfg, max_loras, max_rank
        self.dtype, self.device = dtype, device
        self.adapters: dict[int, LoRAAdapter] = {}
        self._stages: dict[ParallelConfig, StageLoRA] = {}

    def put(self, index: int, adapter: LoRAAdapter | None) -> None:
        """Loads ``adapter`` at ``index`` (``None``: unloads it)."""
        if adapter is None:
            self.adapters.pop(index, None)
        else:
            self.adapters[index] = adapter
        self._stages.clear()

    def active(self, info: RankInfo, indices: list[int], query_lens: list[int]
               ) -> ActiveLoRA | None:
        """What the stage applies to a micro-batch whose sequences run under ``indices``
        (0: the base model); ``None`` when none runs an adapter."""
        if not any(indices):
            return None
        stage = self._stages.get(info.layout)
        if stage is None:
            spec = shard_spec(info.layout, info.rank)
            stage = self._stages[info.layout] = stage_lora(
                self.adapters, self.cfg, spec, self.max_loras, self.max_rank, self.dtype,
                self.device)
        return ActiveLoRA(stage, LoRABatch.build(indices, query_lens, self.device))
