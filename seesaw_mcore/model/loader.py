"""HF safetensors checkpoint -> the weight shard of one (tp_rank, pp_rank); a Megatron
checkpoint is read by ``megatron_checkpoint.py`` into the same shard.

Every tensor is cut with ``safe_open(...).get_slice`` so a rank reads only its own rows or
columns; no rank materializes the full model. Pickle checkpoints are refused.
"""

from __future__ import annotations

import glob
import json
import os
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from seesaw_mcore.config import ModelConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model.hf_names import hf_shapes
from seesaw_mcore.model.params import Cut, ShardSpec, shard_params

__all__ = ["Checkpoint", "ShardSpec", "load_shard", "open_checkpoint"]

if TYPE_CHECKING:
    from seesaw_mcore.model.megatron_checkpoint import MegatronCheckpoint

_FLOAT_DTYPES = ("F32", "F16", "BF16")


class Checkpoint:
    """An opened HF model folder: name -> file map, validated against ``config.json``."""

    def __init__(self, cfg: ModelConfig) -> None:
        self.cfg = cfg
        self.files = _weight_files(cfg.path)
        self._handles = {}
        self.where: dict[str, str] = {}
        for file in self.files:
            try:
                handle = safe_open(file, framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise SeesawError(
                    f"checkpoint file {file} is truncated or corrupt: {str(e).splitlines()[0]}"
                ) from None
            self._handles[file] = handle
            for name in handle.keys():
                self.where[name] = file
        self.fused_qkv = "model.layers.0.self_attn.qkv_proj.weight" in self.where
        self.fused_gate_up = "model.layers.0.mlp.gate_up_proj.weight" in self.where
        self._validate()

    def _expected(self) -> dict[str, tuple[int, ...]]:
        return hf_shapes(self.cfg, self.fused_qkv, self.fused_gate_up)

    def _validate(self) -> None:
        for name, shape in self._expected().items():
            if name not in self.where:
                raise SeesawError(
                    f"tensor {name} is missing from the checkpoint in {self.cfg.path}")
            sl = self._handles[self.where[name]].get_slice(name)
            got = tuple(sl.get_shape())
            if got != shape:
                raise SeesawError(
                    f"tensor {name} has shape {list(got)} but config.json implies {list(shape)}"
                )
            if sl.get_dtype() not in _FLOAT_DTYPES:
                raise SeesawError(
                    f"tensor {name} has dtype {sl.get_dtype()}; expected one of {_FLOAT_DTYPES}"
                )

    def read(self, cut: Cut) -> torch.Tensor:
        """The rows/columns of ``cut``, read from the file without the rest."""
        if cut.rows is None and cut.cols is None:
            return self._handles[self.where[cut.name]].get_tensor(cut.name)
        sl = self._handles[self.where[cut.name]].get_slice(cut.name)
        rows = slice(*cut.rows) if cut.rows else slice(None)
        return sl[rows] if cut.cols is None else sl[rows, cut.cols[0]:cut.cols[1]]


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise SeesawError(f"cannot read {index}: {e}") from None
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
        for file in files:
            if not os.path.isfile(file):
                raise SeesawError(
                    f"checkpoint file {file} listed in model.safetensors.index.json is missing"
                )
        return files
    if os.path.isfile(single):
        return [single]
    others = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if others:
        return others
    if glob.glob(os.path.join(path, "*.bin")) or glob.glob(os.path.join(path, "*.pt")):
        raise SeesawError(
            f"{path} has only pickle weights (*.bin/*.pt), which are never loaded; convert them "
            "with save_pretrained(dir, safe_serialization=True)"
        )
    raise SeesawError(f"no model.safetensors or model.safetensors.index.json in {path}")


def open_checkpoint(cfg: ModelConfig) -> "Checkpoint | MegatronCheckpoint":
    """The model's weights: an HF safetensors folder, or a Megatron checkpoint."""
    if cfg.format == "megatron":
        from seesaw_mcore.model.megatron_checkpoint import MegatronCheckpoint

        return MegatronCheckpoint(cfg)
    return Checkpoint(cfg)


def load_shard(
    ckpt: "Checkpoint | MegatronCheckpoint", spec: ShardSpec, dtype: torch.dtype,
    vocab_multiple: int = 64
) -> dict[str, torch.Tensor]:
    """Cuts the shard of ``spec`` out of the checkpoint as ``params.shard_params`` describes
    it (a Megatron one reads its regions in one collective call:
    ``MegatronCheckpoint.load_shard``).

    Returns:
        A state dict keyed like ``LlamaStage`` parameters: ``embed.weight``,
        ``layers.{j}.qkv.weight`` (local ``[q; k; v]`` rows), ``layers.{j}.gate_up.weight``
        (local ``[gate; up]`` rows), ..., ``norm.weight``, ``lm_head.weight``; layers are
        numbered locally from 0.
    """
    if not isinstance(ckpt, Checkpoint):
        return ckpt.load_shard(spec, dtype, vocab_multiple)
    params = shard_params(ckpt.cfg, spec, ckpt.fused_qkv, ckpt.fused_gate_up, vocab_multiple)
    return {key: p.assemble(ckpt.read).to(dtype).contiguous() for key, p in params.items()}
