"""Host shard store: one rank's weight shards for every layout it may run (both phases of a
``PhasePlan``, or every candidate of ``plan=auto``'s trial), cut from the checkpoint
(safetensors or Megatron) once at start and kept in pinned host memory.

A tensor that is the same in several layouts (replicated norms, a layer the rank holds whole
in both, everything when the plan is static) is stored once and shared by their shards.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from seesaw_mcore.config import ParallelConfig, PhasePlan, split_layers
from seesaw_mcore.model.loader import Checkpoint, ShardSpec, load_shard
from seesaw_mcore.model.weight_update import update_shard

if TYPE_CHECKING:
    from seesaw_mcore.model.megatron_checkpoint import MegatronCheckpoint


def shard_spec(layout: ParallelConfig, rank: int) -> ShardSpec:
    """The shard ``rank`` needs under ``layout``."""
    _, tp_rank, pp_rank = layout.coords(rank)
    return ShardSpec(layout.tp, tp_rank, layout.pp, pp_rank, layout.ep, layout.ep_rank(rank))


class ShardStore:
    """The shards of one rank for each of its layouts, in pinned host memory.

    Args:
        ckpt: the opened checkpoint.
        layouts: the layouts (a ``PhasePlan``: its prefill and decode layouts).
        rank: this rank.
        dtype: parameter dtype.
    """

    def __init__(self, ckpt: Checkpoint | MegatronCheckpoint,
                 layouts: PhasePlan | Sequence[ParallelConfig], rank: int,
                 dtype: torch.dtype) -> None:
        from deepspeed.accelerator import get_accelerator

        pin = get_accelerator().pin_memory
        if isinstance(layouts, PhasePlan):
            layouts = (layouts.prefill, layouts.decode)
        self.cfg, self.rank = ckpt.cfg, rank
        self.shards: dict[str, dict[str, torch.Tensor]] = {}
        self._layouts: dict[str, ParallelConfig] = {}
        by_identity: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        self.unique_bytes = 0
        # sleep(level=2): what ``discard`` freed, to allocate again, and what no update
        # has written since (``(layout, name)``; the weights are not usable until empty)
        self._discarded: dict[str, list[tuple[str, tuple[int, ...], torch.dtype, int]]] = {}
        self.missing: set[tuple[str, str]] = set()
        for layout in layouts:
            key = str(layout)
            if key in self.shards:
                continue
            spec = shard_spec(layout, rank)
            self._layouts[key] = layout
            first_layer = split_layers(ckpt.cfg.num_layers, layout.pp)[spec.pp_rank][0]
            shard = {}
            for name, t in load_shard(ckpt, spec, dtype).items():
                ident = (_global_name(name, first_layer), tuple(t.shape))
                prev = by_identity.get(ident)
                if prev is not None and torch.equal(prev, t):
                    shard[name] = prev  # same tensor in both layouts: stored once
                    continue
                pinned = pin(t)
                by_identity[ident] = pinned
                shard[name] = pinned
                self.unique_bytes += pinned.numel() * pinned.element_size()
            self.shards[key] = shard

    @torch.no_grad()
    def update(self, weights: list[tuple[str, torch.Tensor]]) -> dict[str, set[str]]:
        """Writes full HF tensors into every layout's shard, each layout taking its slices
        (``weight_update.update_shard``); a tensor shared by layouts is written once per layout,
        with the same values. The names must have been checked (``weight_update.check_update``).

        Returns:
            Per layout (``str``), the shard parameter names written.
        """
        touched: dict[str, set[str]] = {key: set() for key in self.shards}
        for key, shard in self.shards.items():
            spec = shard_spec(self._layouts[key], self.rank)
            for name, full in weights:
                touched[key].update(update_shard(shard, spec, self.cfg, name, full))
            self.missing -= {(key, name) for name in touched[key]}
        return touched

    @torch.no_grad()
    def reload(self, ckpt: Checkpoint | MegatronCheckpoint, dtype: torch.dtype
               ) -> dict[str, set[str]]:
        """Reads every layout's shard from another checkpoint of the same model into the
        tensors held now (in place: views and device copies stay valid).

        Returns:
            Per layout (``str``), the shard parameter names written (all of them).
        """
        touched: dict[str, set[str]] = {}
        for key, shard in self.shards.items():
            fresh = load_shard(ckpt, shard_spec(self._layouts[key], self.rank), dtype)
            for name, t in fresh.items():
                shard[name].copy_(t)
            touched[key] = set(fresh)
            self.missing -= {(key, name) for name in fresh}
        return touched

    def discard(self) -> None:
        """Frees every shard (``sleep(level=2)``), remembering names, shapes and which
        tensors layouts share, for ``restore``."""
        self._discarded = {key: [(name, tuple(t.shape), t.dtype, id(t))
                                 for name, t in shard.items()]
                           for key, shard in self.shards.items()}
        self.shards = {key: {} for key in self.shards}

    def restore(self) -> None:
        """Allocates the discarded shards again, pinned and zero, shared as before; every
        tensor is ``missing`` until an update writes it."""
        from deepspeed.accelerator import get_accelerator

        pin = get_accelerator().pin_memory
        made: dict[int, torch.Tensor] = {}
        for key, entries in self._discarded.items():
            for name, shape, dtype, ident in entries:
                if ident not in made:
                    made[ident] = pin(torch.zeros(shape, dtype=dtype))
                self.shards[key][name] = made[ident]
                self.missing.add((key, name))
        self._discarded = {}

    @property
    def discarded(self) -> bool:
        """``discard`` ran and ``restore`` has not."""
        return bool(self._discarded)

    def nbytes(self, layout: ParallelConfig) -> int:
        """Bytes of ``layout``'s shard."""
        return sum(t.numel() * t.element_size() for t in self.shard(layout).values())

    def shard(self, layout: ParallelConfig) -> dict[str, torch.Tensor]:
        """The state dict of ``layout``'s shard (keys as ``LlamaStage`` parameters)."""
        return self.shards[str(layout)]


def _global_name(local: str, first_layer: int) -> str:
    """``layers.{j}.x`` (stage-local) -> ``layers.{first_layer + j}.x``."""
    parts = local.split(".")
    if parts[0] == "layers":
        parts[1] = str(first_layer + int(parts[1]))
    return ".".join(parts)
