"""Configuration dataclasses, validated in ``__post_init__``.

Parallel layouts use the paper's notation: ``T2`` (tensor parallel 2), ``P2`` (pipeline 2),
``D2`` (data parallel 2) and combinations such as ``D2P4`` or ``T4P2``. A degree of 1 is
omitted; a single rank is ``T1``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from seesaw_mcore.errors import SeesawError

_PLAN_TOKEN = re.compile(r"([DTP])(\d+)")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
_STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class ParallelConfig:
    """One parallel layout of the world: data x tensor x pipeline parallel degrees.

    Rank order follows megatron-core's default (``tp-dp-pp``): tensor-parallel ranks are
    adjacent, then data-parallel replicas, then pipeline stages.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SeesawError(f"parallel degree {name}={value!r} must be an integer >= 1")

    @classmethod
    def parse(cls, text: str) -> "ParallelConfig":
        """Parses ``"D2T2P2"``-style notation (letters in any order, each at most once)."""
        raw = str(text).strip().upper()
        tokens = _PLAN_TOKEN.findall(raw)
        if not raw or "".join(f"{k}{v}" for k, v in tokens) != raw:
            raise SeesawError(
                f"invalid parallel layout {text!r}: expected e.g. 'T2', 'P4', 'D2P2', 'T2P2'"
            )
        degrees: dict[str, int] = {}
        for letter, value in tokens:
            if letter in degrees:
                raise SeesawError(f"invalid parallel layout {text!r}: '{letter}' given twice")
            degrees[letter] = int(value)
        return cls(dp=degrees.get("D", 1), tp=degrees.get("T", 1), pp=degrees.get("P", 1))

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """Returns ``(dp_rank, tp_rank, pp_rank)`` of a global rank."""
        return (rank // self.tp) % self.dp, rank % self.tp, rank // (self.tp * self.dp)

    def rank_of(self, dp_rank: int, tp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def __str__(self) -> str:
        parts = [f"{k}{v}" for k, v in (("D", self.dp), ("T", self.tp), ("P", self.pp)) if v > 1]
        return "".join(parts) or "T1"


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

    @classmethod
    def from_pretrained(cls, path: str) -> "ModelConfig":
        """Reads and checks ``config.json`` of a local HF model folder (never downloads)."""
        cfg_file = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            raise SeesawError(f"model path {path!r} is not a directory")
        if not os.path.isfile(cfg_file):
            raise SeesawError(f"model path {path!r} has no config.json")
        try:
            with open(cfg_file, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise SeesawError(f"cannot read {cfg_file}: {e}") from None
        if not isinstance(raw, dict):
            raise SeesawError(f"{cfg_file} is not a JSON object")
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
            hf = AutoConfig.from_pretrained(path, local_files_only=True)
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
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(getattr(hf, "attention_bias", False)),
            rope_parameters=rope,
            torch_dtype=str(dtype),
            eos_token_ids=eos_ids,
            hf_config=hf,
        )

    def check_layout(self, layout: ParallelConfig) -> None:
        """Raises ``SeesawError`` if ``layout`` cannot shard this model."""
        error = layout_error(layout, self.num_heads, self.num_kv_heads, self.intermediate_size,
                             self.num_layers)
        if error:
            raise SeesawError(error)


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 64) -> int:
    """Vocab rounded up so that every TP rank holds an equal, ``multiple``-aligned slice.

    Args:
        vocab_size: the checkpoint's vocabulary size.
        tp: tensor-parallel degree.
        multiple: per-rank alignment (Megatron's ``make_vocab_size_divisible_by``).
    """
    if multiple < 1:
        raise SeesawError(f"vocab padding multiple must be >= 1, got {multiple}")
    step = multiple * tp
    return -(-vocab_size // step) * step


def layout_error(layout: ParallelConfig, num_heads: int, num_kv_heads: int,
                 intermediate_size: int, num_layers: int) -> str | None:
    """Why ``layout`` cannot shard a model of these dimensions, or ``None``."""
    for name, value in (("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads),
                        ("intermediate_size", intermediate_size)):
        if value % layout.tp:
            return f"layout {layout}: TP={layout.tp} does not divide {name}={value}"
    if layout.pp > num_layers:
        return f"layout {layout}: PP={layout.pp} is greater than num_hidden_layers={num_layers}"
    return None


def split_layers(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` layer ranges per pipeline stage; earlier stages get the extra.

    Example: 5 layers over 2 stages -> ``[(0, 3), (3, 5)]``.
    """
    base, extra = divmod(num_layers, pp)
    ranges, start = [], 0
    for stage in range(pp):
        end = start + base + (1 if stage < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def check_world(layout: ParallelConfig, world_size: int) -> None:
    """Raises if the layout does not use exactly ``world_size`` ranks."""
    if layout.world_size != world_size:
        raise SeesawError(
            f"layout {layout} needs DP x TP x PP = {layout.dp} x {layout.tp} x {layout.pp} = "
            f"{layout.world_size} ranks, but the world size is {world_size}"
        )


@dataclass(frozen=True)
class PhasePlan:
    """The prefill layout and the decode layout, on the same ranks (``P2 -> T2``).

    A static plan has ``prefill == decode``; then no switch ever happens.
    """

    prefill: ParallelConfig
    decode: ParallelConfig

    def __post_init__(self) -> None:
        if self.prefill.world_size != self.decode.world_size:
            raise SeesawError(
                f"plan {self}: prefill uses {self.prefill.world_size} ranks but decode uses "
                f"{self.decode.world_size}; both phases run on the same ranks")

    @classmethod
    def parse(cls, prefill: str, decode: str | None = None) -> "PhasePlan":
        """``PhasePlan.parse("P2", "T2")``; ``decode=None`` gives the static plan."""
        p = ParallelConfig.parse(prefill)
        return cls(p, p if decode is None else ParallelConfig.parse(decode))

    @property
    def is_static(self) -> bool:
        return self.prefill == self.decode

    def check_model(self, model: ModelConfig) -> None:
        """Raises if either phase's layout cannot shard ``model``."""
        model.check_layout(self.prefill)
        model.check_layout(self.decode)

    def __str__(self) -> str:
        return str(self.prefill) if self.is_static else f"{self.prefill} -> {self.decode}"


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, itemsize: float,
                       layout: ParallelConfig | None = None) -> float:
    """KV bytes (K and V) of one token on the fullest rank of ``layout``: the first stage's
    layers, ``num_kv_heads / tp`` heads. ``layout=None``: the whole model (a host-tier slot).
    The one place the package computes KV sizes (engine, runner, planner)."""
    lay = layout or ParallelConfig()
    start, end = split_layers(num_layers, lay.pp)[0]
    return 2 * (end - start) * num_kv_heads / lay.tp * head_dim * itemsize
