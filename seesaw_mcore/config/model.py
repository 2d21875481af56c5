"""The model's architecture facts, read from a local HF ``config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from seesaw_mcore.config import megatron
from seesaw_mcore.config.families import SUPPORTED_ARCHITECTURES, Family, family_of
from seesaw_mcore.config.parallel import ParallelConfig, PhasePlan, layout_error
from seesaw_mcore.errors import SeesawError

_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the runtime needs, read from an HF ``config.json``."""

    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_parameters: dict = field(hash=False, compare=False)
    torch_dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = ()
    hf_config: Any = field(default=None, repr=False, hash=False, compare=False)
    format: str = "hf"  # how the weights at ``path`` are stored: "hf" or "megatron"
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (Qwen3)
    # attention window (tokens) when the config uses one; the engine runs it exactly only
    # while every sequence fits in it (``Engine`` checks ``max_model_len``)
    sliding_window: int | None = None
    # mixture of experts (0 experts: dense): experts per MoE layer, experts per token, each
    # expert's intermediate size, renormalized top-k weights, and which layers are MoE
    num_experts: int = 0
    num_experts_per_tok: int = 0
    expert_intermediate_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[int, ...] = ()

    @property
    def family(self) -> Family:
        """The model family module's facts (``config/families``)."""
        return family_of(self.architecture)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer ``layer`` has a mixture-of-experts MLP."""
        return layer in self.moe_layers

    @classmethod
    def open(cls, path: str, format: str = "auto", hf_config_path: str | None = None,
             tokenizer: str | None = None) -> "ModelConfig":
        """The model at ``path``: an HF folder, or a Megatron checkpoint (``format``
        ``"megatron"``, or ``"auto"`` and ``path`` looks like one).

        A Megatron checkpoint's architecture comes from ``hf_config_path`` (an HF folder or
        its ``config.json``), else a ``config.json`` beside the checkpoint, else the
        training arguments it saved (the vocabulary from ``tokenizer`` then).
        """
        if format == "auto":
            format = "megatron" if megatron.looks_like_megatron(path) else "hf"
        if format == "hf":
            return cls.from_pretrained(path, hf_config_path)
        ckpt = megatron.checkpoint_dir(path)
        sources = [hf_config_path] if hf_config_path else [ckpt, path]
        for src in sources:
            if os.path.isfile(os.path.join(src, "config.json")) or src.endswith(".json"):
                return dataclasses.replace(cls.from_pretrained(ckpt, src), format="megatron")
        args = megatron.saved_args(ckpt)
        if args is None:
            raise SeesawError(f"{ckpt} saved no training arguments and has no config.json; "
                              "give the model's HF config.json with model.hf_config_path")
        vocab = None
        if tokenizer:
            from transformers import AutoTokenizer

            vocab = len(AutoTokenizer.from_pretrained(tokenizer))
        raw = megatron.hf_config_from_args(args, vocab, ckpt)
        label = f"the training arguments saved in {ckpt}"
        return dataclasses.replace(cls._checked(ckpt, label, raw), format="megatron")

    @classmethod
    def from_pretrained(cls, path: str, config_path: str | None = None) -> "ModelConfig":
        """Reads and checks ``config.json`` of a local HF model folder (never downloads).

        Args:
            path: the model folder (its weights).
            config_path: another folder (or ``config.json``) to read the config from.
        """
        if not os.path.isdir(path):
            raise SeesawError(f"model path {path!r} is not a directory")
        src = config_path or path
        cfg_file = src if src.endswith(".json") else os.path.join(src, "config.json")
        if not os.path.isfile(cfg_file):
            raise SeesawError(f"model path {src!r} has no config.json")
        try:
            with open(cfg_file, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise SeesawError(f"cannot read {cfg_file}: {e}") from None
        if not isinstance(raw, dict):
            raise SeesawError(f"{cfg_file} is not a JSON object")
        return cls._checked(path, cfg_file, raw)

    @classmethod
    def _checked(cls, path: str, cfg_file: str, raw: dict) -> "ModelConfig":
        try:
            cfg = cls._from_raw(path, cfg_file, raw)
        except SeesawError:
            raise
        except (TypeError, ValueError, ZeroDivisionError, AttributeError, KeyError) as e:
            raise SeesawError(f"{cfg_file} is not a valid model config: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
        sizes = {k: getattr(cfg, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "max_position_embeddings")}
        bad = [f"{k}={v}" for k, v in sizes.items() if v < 1]
        if bad:
            raise SeesawError(f"{cfg_file}: {', '.join(bad)} must be >= 1")
        if cfg.num_heads % cfg.num_kv_heads:
            raise SeesawError(f"{cfg_file}: num_attention_heads={cfg.num_heads} is not a "
                              f"multiple of num_key_value_heads={cfg.num_kv_heads}")
        return cfg

    @classmethod
    def _from_raw(cls, path: str, cfg_file: str, raw: dict) -> "ModelConfig":
        archs = raw.get("architectures") or []
        if not isinstance(archs, list):
            archs = [archs]
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise SeesawError(
                f"unsupported architectures {archs} in {cfg_file}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        from transformers import AutoConfig

        try:
            if os.path.isfile(cfg_file):
                hf = AutoConfig.from_pretrained(cfg_file, local_files_only=True)
            else:  # a dict made from a Megatron checkpoint's saved arguments
                hf = AutoConfig.for_model(**raw)
        except Exception as e:  # noqa: BLE001 - transformers validates fields its own way
            raise ValueError(str(e).replace("\n", " ")) from None
        rope = dict(getattr(hf, "rope_parameters", None) or {})
        rope.setdefault("rope_type", "default")
        rope.setdefault("rope_theta", getattr(hf, "rope_theta", 10000.0))
        if rope["rope_type"] not in _STATIC_ROPE_TYPES:
            raise SeesawError(
                f"rope type {rope['rope_type']!r} in {cfg_file} is not supported; "
                f"supported: {', '.join(_STATIC_ROPE_TYPES)}"
            )
        heads = int(hf.num_attention_heads)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in eos_ids):
            raise ValueError(f"eos_token_id must be an int or a list of ints, got {eos!r}")
        dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        family = family_of(arch)
        return cls(
            path=os.path.abspath(path),
            architecture=arch,
            vocab_size=int(hf.vocab_size),
            hidden_size=int(hf.hidden_size),
            intermediate_size=int(hf.intermediate_size),
            num_layers=int(hf.num_hidden_layers),
            num_heads=heads,
            num_kv_heads=int(getattr(hf, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(hf, "head_dim", None) or hf.hidden_size // heads),
            rms_norm_eps=float(hf.rms_norm_eps),
            max_position_embeddings=int(hf.max_position_embeddings),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=family.qkv_bias or bool(getattr(hf, "attention_bias", False)),
            qk_norm=family.qk_norm,
            sliding_window=family.window(hf),
            **family.experts(hf),
            rope_parameters=rope,
            torch_dtype=str(dtype),
            eos_token_ids=eos_ids,
            hf_config=hf,
        )

    def check_context(self, max_model_len: int) -> None:
        """Raises unless a sliding window (if the config uses one) is exact at this length:
        no sequence longer than the window, so no key ever falls outside it."""
        if self.sliding_window is not None and max_model_len > self.sliding_window:
            raise SeesawError(
                f"{self.architecture} uses sliding-window attention (window "
                f"{self.sliding_window} tokens), which this engine runs only while every "
                f"sequence fits in the window; set model.max_model_len <= "
                f"{self.sliding_window} (it is {max_model_len})")

    def check_plan(self, plan: PhasePlan) -> None:
        """Raises ``SeesawError`` if either phase's layout cannot shard this model."""
        self.check_layout(plan.prefill)
        self.check_layout(plan.decode)

    def check_layout(self, layout: ParallelConfig) -> None:
        """Raises ``SeesawError`` if ``layout`` cannot shard this model (the one check of a
        layout against a model; ``layout_error`` is its shape-only part, which the planner
        also uses)."""
        error = layout_error(layout, self.num_heads, self.num_kv_heads, self.intermediate_size,
                             self.num_layers)
        if error is None and self.num_experts and self.expert_intermediate_size % layout.tp:
            error = (f"layout {layout}: TP={layout.tp} does not divide the experts' "
                     f"intermediate size {self.expert_intermediate_size}")
        if error is None and layout.ep > 1 and not self.num_experts:
            error = (f"layout {layout}: {self.architecture} has no experts (E is for "
                     "mixture-of-experts models)")
        if error is None and layout.ep > 1 and self.num_experts % layout.ep:
            error = (f"layout {layout}: E={layout.ep} does not divide "
                     f"num_experts={self.num_experts}")
        if error:
            raise SeesawError(error)
