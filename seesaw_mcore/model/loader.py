"""HF safetensors checkpoint -> the weight shard of one (tp_rank, pp_rank); a Megatron
checkpoint is read by ``megatron_checkpoint.py`` into the same shard.

Every tensor is cut with ``safe_open(...).get_slice`` so a rank reads only its own rows or
columns; no rank materializes the full model. Pickle checkpoints are refused.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from seesaw_mcore.config import ModelConfig, padded_vocab_size, split_layers
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model.hf_names import hf_shapes, moe_names, part

if TYPE_CHECKING:
    from seesaw_mcore.model.megatron_checkpoint import MegatronCheckpoint

_FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class ShardSpec:
    """Which part of the model one rank holds under one layout."""

    tp: int
    tp_rank: int
    pp: int
    pp_rank: int
    ep: int = 1  # expert parallel: this rank holds experts [ep_rank E/ep, (ep_rank+1) E/ep)
    ep_rank: int = 0

    def experts(self, num_experts: int) -> range:
        """The experts (global ids) this rank holds: all of them without E."""
        n = num_experts // self.ep
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp - 1


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

    def rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows ``[start, end)`` of a tensor (the whole of a 1-D slice range)."""
        return self._handles[self.where[name]].get_slice(name)[start:end]

    def cols(self, name: str, start: int, end: int) -> torch.Tensor:
        """Columns ``[start, end)`` of a 2-D tensor."""
        return self._handles[self.where[name]].get_slice(name)[:, start:end]

    def full(self, name: str) -> torch.Tensor:
        return self._handles[self.where[name]].get_tensor(name)


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
    """Cuts the shard of ``spec`` out of the checkpoint (a Megatron one reads its regions
    in one collective call: ``MegatronCheckpoint.load_shard``).

    Returns:
        A state dict keyed like ``LlamaStage`` parameters: ``embed.weight``,
        ``layers.{j}.qkv.weight`` (local ``[q; k; v]`` rows), ``layers.{j}.gate_up.weight``
        (local ``[gate; up]`` rows), ..., ``norm.weight``, ``lm_head.weight``; layers are
        numbered locally from 0.
    """
    if not isinstance(ckpt, Checkpoint):
        return ckpt.load_shard(spec, dtype, vocab_multiple)
    c, t, r = ckpt.cfg, spec.tp, spec.tp_rank
    out: dict[str, torch.Tensor] = {}
    vocab_pad = padded_vocab_size(c.vocab_size, t, vocab_multiple)
    if spec.is_first:
        out["embed.weight"] = _vocab_rows(ckpt, "model.embed_tokens.weight", vocab_pad, t, r)
    start, end = split_layers(c.num_layers, spec.pp)[spec.pp_rank]
    for j, layer in enumerate(range(start, end)):
        p, q = f"model.layers.{layer}.", f"layers.{j}."
        out[q + "qkv.weight"] = _qkv(ckpt, p, "weight", t, r)
        if c.qkv_bias:
            out[q + "qkv.bias"] = _qkv(ckpt, p, "bias", t, r)
        qo = c.num_heads * c.head_dim
        out[q + "o_proj.weight"] = ckpt.cols(p + "self_attn.o_proj.weight", *part(qo, t, r))
        if c.is_moe_layer(layer):
            out.update(_experts(ckpt, p, q, spec))
        else:
            out[q + "gate_up.weight"] = _gate_up(ckpt, p, t, r)
            i = c.intermediate_size
            out[q + "down.weight"] = ckpt.cols(p + "mlp.down_proj.weight", *part(i, t, r))
        out[q + "input_norm.weight"] = ckpt.full(p + "input_layernorm.weight")
        out[q + "post_norm.weight"] = ckpt.full(p + "post_attention_layernorm.weight")
        if c.qk_norm:  # per head, so the same on every TP rank
            out[q + "q_norm.weight"] = ckpt.full(p + "self_attn.q_norm.weight")
            out[q + "k_norm.weight"] = ckpt.full(p + "self_attn.k_norm.weight")
    if spec.is_last:
        out["norm.weight"] = ckpt.full("model.norm.weight")
        head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        out["lm_head.weight"] = _vocab_rows(ckpt, head, vocab_pad, t, r)
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def _vocab_rows(ckpt: Checkpoint, name: str, vocab_pad: int, tp: int, rank: int) -> torch.Tensor:
    start, end = part(vocab_pad, tp, rank)
    real = ckpt.cfg.vocab_size
    rows = ckpt.rows(name, min(start, real), min(end, real))  # [<=Vp/TP, H]
    if rows.shape[0] < end - start:  # zero rows for padding past the real vocab
        pad = rows.new_zeros(end - start - rows.shape[0], rows.shape[1])
        rows = torch.cat([rows, pad])
    return rows


def _qkv(ckpt: Checkpoint, prefix: str, kind: str, tp: int, rank: int) -> torch.Tensor:
    c = ckpt.cfg
    qo, kvo = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    qs, qe = part(qo, tp, rank)
    ks, ke = part(kvo, tp, rank)
    if ckpt.fused_qkv:
        name = prefix + f"self_attn.qkv_proj.{kind}"
        parts = [ckpt.rows(name, qs, qe), ckpt.rows(name, qo + ks, qo + ke),
                 ckpt.rows(name, qo + kvo + ks, qo + kvo + ke)]
    else:
        parts = [ckpt.rows(prefix + f"self_attn.q_proj.{kind}", qs, qe),
                 ckpt.rows(prefix + f"self_attn.k_proj.{kind}", ks, ke),
                 ckpt.rows(prefix + f"self_attn.v_proj.{kind}", ks, ke)]
    return torch.cat(parts)  # [(Hq + 2 Hkv) D / TP, H] or [(Hq + 2 Hkv) D / TP]


def _experts(ckpt: Checkpoint, prefix: str, q: str, spec: ShardSpec
             ) -> dict[str, torch.Tensor]:
    """One MoE layer's router (replicated) and this rank's experts (all of them, or its
    E group's share), each cut to its TP slice, stacked."""
    c = ckpt.cfg
    block, gate, up, down = moe_names(c)
    s, e = part(c.expert_intermediate_size, spec.tp, spec.tp_rank)
    gate_up, downs = [], []
    for x in spec.experts(c.num_experts):
        name = prefix + f"{block}.experts.{x}."
        gate_up.append(torch.cat([ckpt.rows(name + f"{gate}.weight", s, e),
                                  ckpt.rows(name + f"{up}.weight", s, e)]))  # [2 I/TP, H]
        downs.append(ckpt.cols(name + f"{down}.weight", s, e))  # [H, I/TP]
    return {q + "moe.router": ckpt.full(prefix + f"{block}.gate.weight"),  # [E, H]
            q + "moe.gate_up": torch.stack(gate_up),  # [E local, 2 I/TP, H]
            q + "moe.down": torch.stack(downs)}  # [E local, H, I/TP]


def _gate_up(ckpt: Checkpoint, prefix: str, tp: int, rank: int) -> torch.Tensor:
    i = ckpt.cfg.intermediate_size
    s, e = part(i, tp, rank)
    if ckpt.fused_gate_up:
        name = prefix + "mlp.gate_up_proj.weight"
        return torch.cat([ckpt.rows(name, s, e), ckpt.rows(name, i + s, i + e)])
    return torch.cat([ckpt.rows(prefix + "mlp.gate_proj.weight", s, e),
                      ckpt.rows(prefix + "mlp.up_proj.weight", s, e)])  # [2 I / TP, H]
