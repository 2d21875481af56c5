"""Routed experts on the ranks (``enable_return_routed_experts``): each stage's MoE layers'
expert ids for the tokens it ran, passed stage to stage after the hidden states, and each
sequence's rows on its sampled token (``engine/routed.py`` keeps them on rank 0)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from seesaw_mcore.config import ModelConfig
from seesaw_mcore.contract import RankInfo, SampledToken


def stage_routes(model, cfg: ModelConfig, info: RankInfo, tokens: int) -> torch.Tensor:
    """``[T, MoE layers up to this stage's last, top_k]`` int16: the earlier stages' expert
    ids (received from the previous stage after the hidden states, in the same order) and
    this stage's (``model``: the live ``LlamaStage``, after its forward)."""
    mine = model.routes(tokens)
    before = sum(map(cfg.is_moe_layer, range(model.layer_range[0])))
    if not before:
        return mine.contiguous()
    prev = torch.empty(tokens, before, mine.shape[2], dtype=torch.int16, device=mine.device)
    dist.recv(prev, src=info.prev_rank)
    return torch.cat([prev, mine], dim=1)


def attach_routes(tokens: list[SampledToken], query_lens: list[int], routes: torch.Tensor
                  ) -> None:
    """Each sequence's rows of a micro-batch's ``routes`` ``[T, L, k]`` (its tokens fed this
    step, in order) as int16 bytes on its sampled token."""
    data = routes.cpu().numpy()
    start = 0
    for tok, n in zip(tokens, query_lens):
        tok.routed = data[start:start + n].tobytes()
        start += n
