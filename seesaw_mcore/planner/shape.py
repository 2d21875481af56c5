"""What the cost model needs of a model: its dimensions, read from a ``config.json`` or an
opened ``ModelConfig`` (no weights)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

from seesaw_mcore.config import ModelConfig
from seesaw_mcore.config.families import FAMILIES
from seesaw_mcore.errors import SeesawError


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs from an HF ``config.json``."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    # mixture of experts (0: dense): experts per MoE layer, routed per token, each expert's
    # intermediate size, and how many of the layers are MoE
    num_experts: int = 0
    experts_per_tok: int = 0
    expert_intermediate_size: int = 0
    moe_layers: int = 0

    @classmethod
    def of(cls, cfg: ModelConfig) -> "ModelShape":
        """The shape of an opened model (HF folder or Megatron checkpoint)."""
        return cls(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                   cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size, cfg.tie_word_embeddings,
                   cfg.num_experts, cfg.num_experts_per_tok, cfg.expert_intermediate_size,
                   len(cfg.moe_layers))

    @property
    def expert_params(self) -> int:
        """Parameters of one expert (a SwiGLU MLP)."""
        return 3 * self.hidden_size * self.expert_intermediate_size

    def experts_touched(self, tokens: float, experts: float | None = None) -> float:
        """Expected distinct experts (of ``experts``, default all) that ``tokens`` routed
        tokens reach, each taking ``experts_per_tok`` of ``num_experts``. Assumption:
        routing uniform and independent across tokens (a real router is imbalanced; this
        is the best case for weight reads, the worst for all-to-all skew)."""
        e = self.num_experts
        n = e if experts is None else experts
        if not e:
            return 0.0
        return n * (1 - (1 - self.experts_per_tok / e) ** max(tokens, 0.0))

    @classmethod
    def from_config(cls, path: str) -> "ModelShape":
        """Reads ``path`` (a ``config.json`` or the folder holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SeesawError(f"cannot read model config {path}: {e}") from None
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            layers = int(raw["num_hidden_layers"])
            archs = raw.get("architectures") or []
            family = next((FAMILIES[a] for a in archs if a in FAMILIES), None)
            moe_fields = family.experts(SimpleNamespace(**raw)) if family else {}
            experts = moe_fields.get("num_experts", 0)
            moe = len(moe_fields.get("moe_layers", ()))
            return cls(layers, hidden, int(raw["intermediate_size"]),
                       heads, int(raw.get("num_key_value_heads") or heads),
                       int(raw.get("head_dim") or hidden // heads), int(raw["vocab_size"]),
                       bool(raw.get("tie_word_embeddings", False)), experts,
                       int(raw.get("num_experts_per_tok") or 0),
                       moe_fields.get("expert_intermediate_size", raw["intermediate_size"]), moe)
        except KeyError as e:
            raise SeesawError(f"model config {path} has no {e.args[0]}") from None
        except AttributeError as e:  # a family's expert fields read attributes
            raise SeesawError(f"model config {path} has no {e.name}") from None

    @property
    def attn_params(self) -> int:
        """Parameters of one layer's attention projections."""
        h, d = self.hidden_size, self.head_dim
        return h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h

    @property
    def dense_params(self) -> float:
        """A layer's parameters that are not experts, averaged over the layers (attention,
        the dense layers' MLP, the MoE layers' routers)."""
        dense_mlp = (self.num_layers - self.moe_layers) * 3 * self.hidden_size \
            * self.intermediate_size
        routers = self.moe_layers * self.num_experts * self.hidden_size
        return self.attn_params + (dense_mlp + routers) / self.num_layers

    @property
    def experts_per_layer(self) -> float:
        """Experts per layer, averaged over the layers."""
        return self.moe_layers * self.num_experts / self.num_layers

    @property
    def layer_params(self) -> float:
        """Parameters of one decoder layer, every expert counted (memory)."""
        return self.dense_params + self.experts_per_layer * self.expert_params

    @property
    def active_layer_params(self) -> float:
        """Parameters one token uses in a layer (FLOPs): the routed experts only."""
        routed = self.moe_layers * self.experts_per_tok / self.num_layers
        return self.dense_params + routed * self.expert_params

    @property
    def params(self) -> int:
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return int(self.num_layers * self.layer_params + embed)
