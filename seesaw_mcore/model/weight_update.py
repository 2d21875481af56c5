"""New full HF tensors -> the slices a rank's shard holds (``LLM.update_weights``): every
pair checked against the model's names and shapes first, then each written into a shard
exactly as ``loader.load_shard`` cut it."""

from __future__ import annotations

import torch

from seesaw_mcore.config import ModelConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model.hf_names import hf_shapes
from seesaw_mcore.model.params import ShardSpec, update_targets


def check_update(c: ModelConfig, weights: list[tuple[str, torch.Tensor]]) -> None:
    """Raises a one-line ``SeesawError`` for the first name that is not the model's, a shape
    that is not the full tensor's, or a tensor that is not floating point (nothing is
    written before every one is checked)."""
    known = hf_shapes(c, False, False) | hf_shapes(c, True, True)
    for name, t in weights:
        if name not in known:
            raise SeesawError(f"update_weights: {name!r} is not a parameter of this model")
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise SeesawError(f"update_weights: {name} must be a floating-point tensor, got "
                              f"{getattr(t, 'dtype', type(t).__name__)}")
        if tuple(t.shape) != known[name]:
            raise SeesawError(f"update_weights: {name} has shape {list(t.shape)} but the "
                              f"model's is {list(known[name])} (full, unsharded tensors)")


def update_shard(shard: dict[str, torch.Tensor], spec: ShardSpec, c: ModelConfig, name: str,
                 full: torch.Tensor, vocab_multiple: int = 64) -> list[str]:
    """Writes this rank's cuts of the HF tensor ``name`` into ``shard`` (a ``load_shard``
    state dict) in place, exactly where ``load_shard`` put them (``params.update_targets``).

    Returns:
        The shard's parameter names written (none when the tensor is not this rank's).
    """
    written: list[str] = []
    for target in update_targets(c, spec, vocab_multiple).get(name, ()):
        dst = shard[target.key] if target.item is None else shard[target.key][target.item]
        src = target.cut.of(full)
        dst[target.row:target.row + src.shape[0]].copy_(src)  # padding rows stay 0
        if target.key not in written:
            written.append(target.key)
    return written
