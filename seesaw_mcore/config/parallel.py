"""Parallel layouts and plans, in the paper's notation: ``T2`` (tensor parallel 2), ``P2``
(pipeline 2), ``D2`` (data parallel 2) and combinations such as ``D2P4`` or ``T4P2``. A degree of
1 is omitted; a single rank is ``T1``. ``E2`` (expert parallel 2, mixture-of-experts models):
two replicas as ``D2`` for attention and everything dense, each holding half the experts,
tokens exchanged with all-to-all at every MoE layer; ``D2E2`` is two such pairs (4 ranks).
A plan is a prefill layout and a decode layout on the same ranks: ``"T2"`` (static),
``"P2:T2"`` (re-shards between the phases).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from seesaw_mcore.errors import SeesawError

_PLAN_TOKEN = re.compile(r"([DTPE])(\d+)")


@dataclass(frozen=True)
class ParallelConfig:
    """One parallel layout of the world: data x tensor x pipeline parallel degrees.

    Rank order follows megatron-core's default (``tp-dp-pp``): tensor-parallel ranks are
    adjacent, then data-parallel replicas, then pipeline stages.
    """

    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1  # expert parallel: consecutive groups of ``ep`` of the ``dp`` replicas

    def __post_init__(self) -> None:
        for name in ("dp", "tp", "pp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise SeesawError(f"parallel degree {name}={value!r} must be an integer >= 1")
        if self.dp % self.ep:
            raise SeesawError(f"expert parallel degree {self.ep} does not divide the "
                              f"{self.dp} replicas")
        if self.ep > 1 and (self.tp > 1 or self.pp > 1):
            raise SeesawError(f"layout {self}: E combines with D only (E2, D2E2); use E and "
                              "T or P in the two phases of a plan instead (E2:T2, P2:E2)")

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
        ep = degrees.get("E", 1)
        return cls(dp=degrees.get("D", 1) * ep, tp=degrees.get("T", 1), pp=degrees.get("P", 1),
                   ep=ep)

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp

    def coords(self, rank: int) -> tuple[int, int, int]:
        """Returns ``(dp_rank, tp_rank, pp_rank)`` of a global rank."""
        return (rank // self.tp) % self.dp, rank % self.tp, rank // (self.tp * self.dp)

    def rank_of(self, dp_rank: int, tp_rank: int, pp_rank: int) -> int:
        return tp_rank + self.tp * (dp_rank + self.dp * pp_rank)

    def last_stage_rank(self, dp_rank: int) -> int:
        """The rank that samples replica ``dp_rank``'s tokens: TP rank 0 of its last stage."""
        return self.rank_of(dp_rank, 0, self.pp - 1)

    def ep_rank(self, rank: int) -> int:
        """A rank's place in its expert-parallel group (0 without E)."""
        return self.coords(rank)[0] % self.ep

    def __str__(self) -> str:
        degrees = (("D", self.dp // self.ep), ("E", self.ep), ("T", self.tp), ("P", self.pp))
        return "".join(f"{k}{v}" for k, v in degrees if v > 1) or "T1"


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
        """``PhasePlan.parse("P2", "T2")``; ``decode=None`` gives the static plan, and then
        ``prefill`` may be a whole plan string (see ``from_string``)."""
        if decode is None:
            return cls.from_string(prefill)
        return cls(ParallelConfig.parse(prefill), ParallelConfig.parse(decode))

    @classmethod
    def from_string(cls, text: str) -> "PhasePlan":
        """``"T2"`` (static), ``"P2:T2"`` (prefill:decode; ``P2->T2`` and the preset-style
        ``p2_t2`` read the same)."""
        raw = str(text).strip()
        for sep in ("->", ":", "_"):
            if sep in raw:
                parts = [p.strip() for p in raw.split(sep)]
                if len(parts) != 2 or not all(parts):
                    raise SeesawError(f"invalid plan {text!r}: expected a layout ('T2') or "
                                      "prefill:decode ('P2:T2')")
                return cls(ParallelConfig.parse(parts[0]), ParallelConfig.parse(parts[1]))
        p = ParallelConfig.parse(raw)
        return cls(p, p)

    def to_string(self) -> str:
        """The plan string ``from_string`` reads: ``"T2"`` or ``"P2:T2"``."""
        return str(self.prefill) if self.is_static else f"{self.prefill}:{self.decode}"

    @property
    def is_static(self) -> bool:
        return self.prefill == self.decode

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
