"""What a model family module declares (``Family``) and the helpers families share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class MoENames:
    """The HF names of an MoE block: ``model.layers.L.<block>.gate.weight`` (router) and
    ``<block>.experts.E.<gate|up|down>.weight``."""

    block: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"


def no_window(hf: Any) -> int | None:
    """A family without sliding-window attention."""
    return None


def no_experts(hf: Any) -> dict[str, Any]:
    """A dense family: no ``ModelConfig`` expert fields."""
    return {}


@dataclass(frozen=True)
class Family:
    """One decoder family's differences from the Llama decoder.

    Attributes:
        architecture: the HF ``architectures`` entry.
        name: how users call it (errors, the README).
        qkv_bias: q/k/v projections always carry biases (else only with ``attention_bias``).
        qk_norm: RMSNorm over each head of q and k before RoPE.
        window: the config's attention window in tokens (``None``: unwindowed).
        experts: ``ModelConfig``'s expert fields from the HF config (empty: dense).
        moe_names: the HF names of its MoE blocks (dense families: the default).
    """

    architecture: str
    name: str
    qkv_bias: bool = False
    qk_norm: bool = False
    window: Callable[[Any], int | None] = field(default=no_window, compare=False)
    experts: Callable[[Any], dict[str, Any]] = field(default=no_experts, compare=False)
    moe_names: MoENames = MoENames()


def hf_window(hf: Any, needs_flag: bool) -> int | None:
    """A config's ``sliding_window`` when it applies (Qwen's only with
    ``use_sliding_window`` and a sliding layer), ``None`` when it covers the context."""
    window = getattr(hf, "sliding_window", None)
    if not window:
        return None
    if needs_flag:
        if not getattr(hf, "use_sliding_window", False):
            return None
        layer_types = getattr(hf, "layer_types", None)
        if layer_types and "sliding_attention" not in layer_types:
            return None
    if int(window) >= int(hf.max_position_embeddings):
        return None
    return int(window)
