"""Mixture-of-experts MLP (Qwen3-MoE, Mixtral), experts sharded along TP or split by E.

- TP (every plan): each rank holds a ``1/TP`` slice of every expert's intermediate dimension
  (gate, up and down cut as a dense SwiGLU MLP is cut), so an MoE layer costs the same
  communication as a dense one: the router runs replicated, each rank computes its slice of
  every routed expert for every token, and one TP all-reduce sums the partial outputs.
- E (expert parallel, ``E2``, ``D2E2``): the ranks of an E group are replicas with their own
  tokens (as ``D``); each holds ``1/E`` of the experts whole. At every MoE layer the routed
  (token, expert) rows go to the experts' owners and come back with one ``all_to_all`` each
  way (counts first, so every rank knows its split sizes). A rank with no tokens in a step
  still takes part (``idle``), so the exchanges pair up.

Why not megatron-core's ``MoELayer``: its token dispatchers, router and grouped experts are
built for training (capacity factors, auxiliary losses, sequence-parallel layouts, Transformer
Engine grouped GEMMs, parallel_state's expert groups) and take megatron's own layer spec;
this engine's stages are inference modules over a paged KV cache, re-sharded between
layouts from host shards. The routing arithmetic follows HF's modules exactly (softmax in
float32 over all experts, top-k, renormalized when the config says), so greedy tokens match.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seesaw_mcore.config import ModelConfig
from seesaw_mcore.contract import RankInfo
from seesaw_mcore.model import invariant
from seesaw_mcore.model.layers import TPAllReduce


class MoEMLP(nn.Module):
    """Router + experts of one layer, TP-sharded or split by E.

    Parameters (the shard's ``layers.{j}.moe.*``): ``router`` ``[E, H]`` (replicated),
    ``gate_up`` ``[E/EP, 2 I/TP, H]`` (each local expert's gate rows, then its up rows),
    ``down`` ``[E/EP, H, I/TP]``.
    """

    def __init__(self, cfg: ModelConfig, info: RankInfo, dtype: torch.dtype) -> None:
        super().__init__()
        tp, self.ep = info.layout.tp, info.layout.ep
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.expert_intermediate_size // tp
        local = e // self.ep  # experts held here
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.router = nn.Parameter(torch.empty(e, h, dtype=dtype), requires_grad=False)
        self.gate_up = nn.Parameter(torch.empty(local, 2 * i, h, dtype=dtype),
                                    requires_grad=False)
        self.down = nn.Parameter(torch.empty(local, h, i, dtype=dtype), requires_grad=False)
        self.reduce = TPAllReduce(info.tp_group)
        self.ep_group = info.ep_group
        self.record = False  # keep each forward's expert ids (routed-experts replay)
        self.routes: torch.Tensor | None = None  # [T, k] int16, the last forward's

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` ``[T, H]`` -> (weights ``[T, k]`` in ``h``'s dtype, expert ids ``[T, k]``)."""
        probs = F.softmax(invariant.linear(h, self.router).float(), dim=-1)  # [T, E]
        weights, experts = probs.topk(self.top_k, dim=-1)  # [T, k] each
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(h.dtype), experts

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Local expert ``e`` (its TP slice) on rows ``x`` ``[n, H]`` -> ``[n, H]``."""
        gate, up = invariant.linear(x, self.gate_up[e]).chunk(2, dim=-1)  # [n, I/TP] each
        return invariant.linear(F.silu(gate) * up, self.down[e])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Normed ``h`` ``[T, H]`` -> ``[T, H]`` (summed over TP)."""
        weights, experts = self.route(h)
        if self.record:
            self.routes = experts.to(torch.int16)
        flat = experts.flatten()  # [T k]
        order = flat.argsort(stable=True)  # token-expert pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.router.shape[0])  # [E]
        tokens = order // self.top_k  # [T k] the token of each pair, grouped
        scale = weights.flatten()[order].unsqueeze(-1)  # [T k, 1]
        rows = h[tokens]  # [T k, H]
        if self.ep > 1:
            y = self._exchange(rows, counts)  # each pair's expert output
        else:
            y = self._grouped(rows, counts.tolist())
        out = torch.zeros_like(h)  # [T, H]
        out.index_add_(0, tokens, y * scale)
        return self.reduce(out)

    def _exchange(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Expert parallel: ``rows`` ``[N, H]`` grouped by expert (so by owner) go to the
        experts' ranks, are computed there and come back in the same order."""
        ep, local = self.ep, self.gate_up.shape[0]
        send = counts.view(ep, local)  # [ep, local] rows for each owner's experts
        recv = torch.empty_like(send)  # [ep, local] each source's rows for my experts
        dist.all_to_all_single(recv, send, group=self.ep_group)
        out_splits, in_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        got = rows.new_empty(sum(in_splits), rows.shape[1])
        _all_to_all(got, rows, in_splits, out_splits, self.ep_group)
        done = self._grouped(got, recv.flatten().tolist())  # per source, per my expert
        back = torch.empty_like(rows)
        _all_to_all(back, done, out_splits, in_splits, self.ep_group)
        return back

    def _grouped(self, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``rows`` ``[N, H]`` in runs of ``counts``, run ``j`` for local expert
        ``j % local``, each run through its expert -> ``[N, H]``."""
        out = torch.empty_like(rows)
        local, start = self.gate_up.shape[0], 0
        for j, n in enumerate(counts):
            if n:
                out[start:start + n] = self.expert(j % local, rows[start:start + n])
            start += n
        return out

    def idle(self) -> None:
        """This rank's part of an exchange it has no tokens for (E layouts)."""
        self(self.router.new_empty(0, self.router.shape[1]))


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int],
                in_splits: list[int], group) -> None:
    """``all_to_all_single`` with row splits; 2-byte float rows travel as int16 on gloo
    (which has no bfloat16 / float16 all-to-all): the same bits."""
    if inp.element_size() == 2 and dist.get_backend(group) == "gloo":
        out, inp = out.view(torch.int16), inp.view(torch.int16)
    dist.all_to_all_single(out, inp.contiguous(), out_splits, in_splits, group=group)
