"""LoRA adapters as PEFT saves them, read and checked against the model (vLLM's
``LoRARequest`` surface); ``model/lora_layers.py`` applies them in the forward.

A PEFT adapter folder holds ``adapter_config.json`` (``peft_type`` ``LORA``, ``r``,
``lora_alpha``, ``use_rslora``, ``target_modules``) and ``adapter_model.safetensors`` with
``base_model.model.model.layers.{i}.{self_attn|mlp}.{module}.lora_A.weight`` ``[r, in]`` and
``...lora_B.weight`` ``[out, r]``. The update of a target's weight is ``scale * B @ A`` with
``scale = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with rslora), as PEFT defines it.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from seesaw_mcore.config import ModelConfig
from seesaw_mcore.errors import SeesawError

_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
                  r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")  # (a live model's adapter name)


@dataclass(frozen=True)
class LoRARequest:
    """Which adapter a request runs under (vLLM's fields and order).

    Attributes:
        lora_name: the adapter's name (the server's ``model=`` for it).
        lora_int_id: a positive id, unique per adapter.
        lora_path: the PEFT adapter folder.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) \
                or self.lora_int_id < 1:
            raise SeesawError(f"LoRARequest {self.lora_name!r}: lora_int_id must be an integer "
                              f">= 1, got {self.lora_int_id!r}")


@dataclass
class LoRAAdapter:
    """An adapter's full (unsharded) tensors, checked against the model.

    Attributes:
        request: where it came from.
        rank: ``r``.
        scale: ``lora_alpha / r`` (rslora: ``lora_alpha / sqrt(r)``).
        weights: ``(layer, module) -> (A [r, in], B [out, r])``, float32.
    """

    request: LoRARequest
    rank: int
    scale: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def modules(self) -> set[str]:
        """The target modules it changes."""
        return {m for _, m in self.weights}


def target_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``module -> (out, in)`` of each module a LoRA adapter may target in this model (the
    MLP's only where layers are dense)."""
    h, qo, kvo = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    shapes = {"q_proj": (qo, h), "k_proj": (kvo, h), "v_proj": (kvo, h), "o_proj": (h, qo)}
    if not cfg.num_experts:
        i = cfg.intermediate_size
        shapes.update({"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)})
    return shapes


def load_adapter(request: LoRARequest, cfg: ModelConfig, max_lora_rank: int) -> LoRAAdapter:
    """Reads and checks ``request``'s folder; every problem is one line naming the adapter,
    and nothing is returned half-read.

    Raises:
        SeesawError: missing files, not a LoRA adapter, a rank above ``max_lora_rank``, a
            target module the model lacks, or a tensor whose shape is not this model's.
    """
    from safetensors.torch import load_file

    name, path = request.lora_name, request.lora_path
    conf_file = os.path.join(path, "adapter_config.json")
    weights_file = os.path.join(path, "adapter_model.safetensors")
    for f in (conf_file, weights_file):
        if not os.path.isfile(f):
            raise SeesawError(f"LoRA adapter {name!r}: {f} does not exist")
    try:
        with open(conf_file) as fh:
            conf = json.load(fh)
    except (OSError, ValueError) as e:
        raise SeesawError(f"LoRA adapter {name!r}: {conf_file} is not valid JSON ({e})") from None
    if str(conf.get("peft_type", "")).upper() != "LORA":
        raise SeesawError(f"LoRA adapter {name!r}: peft_type is {conf.get('peft_type')!r}, "
                          "not LORA")
    unsupported = [(bool(conf.get("use_dora")), "use_dora (DoRA)"),
                   (bool(conf.get("rank_pattern")), "rank_pattern (per-module ranks)"),
                   (bool(conf.get("alpha_pattern")), "alpha_pattern (per-module alphas)"),
                   (bool(conf.get("modules_to_save")), "modules_to_save"),
                   (conf.get("bias", "none") != "none" or bool(conf.get("lora_bias")),
                    "trained biases (bias / lora_bias)"),
                   (bool(conf.get("fan_in_fan_out")), "fan_in_fan_out")]
    for refused, what in unsupported:
        if refused:
            raise SeesawError(f"LoRA adapter {name!r}: {what} is not supported")
    rank = conf.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise SeesawError(f"LoRA adapter {name!r}: r must be an integer >= 1, got {rank!r}")
    if rank > max_lora_rank:
        raise SeesawError(f"LoRA adapter {name!r}: its rank {rank} is above max_lora_rank "
                          f"{max_lora_rank}")
    shapes = target_shapes(cfg)
    targets = conf.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    lacking = sorted(set(targets) - set(shapes))
    if lacking:
        raise SeesawError(f"LoRA adapter {name!r}: target module {lacking[0]!r} is not one "
                          f"this model's adapters can change ({', '.join(shapes)})")
    alpha = float(conf.get("lora_alpha", rank))
    scale = alpha / math.sqrt(rank) if conf.get("use_rslora") else alpha / rank
    try:
        tensors = load_file(weights_file)
    except Exception as e:  # noqa: BLE001 - safetensors reports corruption its own ways
        raise SeesawError(f"LoRA adapter {name!r}: {weights_file} cannot be read "
                          f"({str(e).splitlines()[0][:200]})") from None
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise SeesawError(f"LoRA adapter {name!r}: unexpected tensor {key!r}")
        layer, module, ab = int(m.group(1)), m.group(3), m.group(4)
        if module not in shapes or layer >= cfg.num_layers:
            raise SeesawError(f"LoRA adapter {name!r}: {key} is not a module of this model "
                              "(an adapter of another base model?)")
        out, inp = shapes[module]
        want = (rank, inp) if ab == "A" else (out, rank)
        if tuple(t.shape) != want:
            raise SeesawError(f"LoRA adapter {name!r}: {key} has shape {list(t.shape)}, this "
                              f"model's is {list(want)} (an adapter of another base model?)")
        parts.setdefault((layer, module), {})[ab] = t.float()
    weights = {}
    for (layer, module), ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise SeesawError(f"LoRA adapter {name!r}: layer {layer} {module} has lora_"
                              f"{next(iter(ab))} without its pair")
        weights[(layer, module)] = (ab["A"], ab["B"])
    return LoRAAdapter(request, rank, scale, weights)


def is_adapter_name(name: str) -> bool:
    """Whether ``name`` is a PEFT adapter tensor's name (``...lora_A.weight``)."""
    return name.startswith("base_model.model.")


def updated(adapter: LoRAAdapter, pairs: list[tuple[str, torch.Tensor]]) -> LoRAAdapter:
    """``adapter`` with the tensors ``pairs`` (PEFT names) replaced, every pair checked
    first (a module it does not target, a shape of another rank: one line, nothing
    changed)."""
    name = adapter.request.lora_name
    weights = dict(adapter.weights)
    for key, t in pairs:
        m = _KEY.match(key)
        if m is None or (int(m.group(1)), m.group(3)) not in weights:
            raise SeesawError(f"update_weights: {key!r} is not a tensor of LoRA adapter "
                              f"{name!r}")
        where, ab = (int(m.group(1)), m.group(3)), m.group(4)
        a, b = weights[where]
        old = a if ab == "A" else b
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() \
                or tuple(t.shape) != tuple(old.shape):
            raise SeesawError(f"update_weights: {key} must be a floating-point tensor of shape "
                              f"{list(old.shape)} (LoRA adapter {name!r}), got "
                              f"{list(getattr(t, 'shape', []))}")
        weights[where] = (t.float().cpu(), b) if ab == "A" else (a, t.float().cpu())
    return LoRAAdapter(adapter.request, adapter.rank, adapter.scale, weights)

