"""The one description of how a rank's shard is cut from a model's full HF tensors.

Every shard parameter (``LlamaStage``'s names: ``embed.weight``, ``layers.{j}.qkv.weight``,
``layers.{j}.moe.gate_up``, ...) is a ``ShardParam``: the row/column ``Cut`` s of full HF
tensors it is made of, concatenated on rows (stacked per expert for the MoE tensors), then
zero rows up to the padded vocabulary. The three readers use it and nothing else:

- ``loader.load_shard`` reads each cut from safetensors (``get_slice``: only its rows);
- ``weight_update.update_shard`` writes a new full tensor's cuts where they sit
  (``update_targets``), whichever spelling (split or fused q/k/v, gate/up) it comes in;
- ``megatron_checkpoint`` maps each cut to regions of megatron-core's tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from seesaw_mcore.config import ModelConfig, padded_vocab_size, split_layers
from seesaw_mcore.model.hf_names import moe_names, part


@dataclass(frozen=True)
class ShardSpec:
    """Which part of the model one rank holds under one layout."""

    tp: int
    tp_rank: int
    pp: int
    pp_rank: int
    ep: int = 1  # expert parallel: this rank holds experts [ep_rank E/ep, (ep_rank+1) E/ep)
    ep_rank: int = 0

    def experts(self, num_experts: int) -> range:
        """The experts (global ids) this rank holds: all of them without E."""
        n = num_experts // self.ep
        return range(self.ep_rank * n, (self.ep_rank + 1) * n)

    @property
    def is_first(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pp_rank == self.pp - 1



@dataclass(frozen=True)
class Cut:
    """Rows ``[rows)`` and/or columns ``[cols)`` of the full HF tensor ``name`` (``None``:
    all of them)."""

    name: str
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None

    def of(self, full: torch.Tensor) -> torch.Tensor:
        """This cut of ``full``."""
        out = full if self.rows is None else full[self.rows[0]:self.rows[1]]
        return out if self.cols is None else out[:, self.cols[0]:self.cols[1]]


@dataclass(frozen=True)
class ShardParam:
    """One shard parameter: ``items`` (one per stacked expert, else one) each the row
    concatenation of its cuts, zero-padded to ``pad_rows`` rows when set."""

    items: tuple[tuple[Cut, ...], ...]
    stacked: bool = False
    pad_rows: int | None = None

    def assemble(self, read: Callable[[Cut], torch.Tensor]) -> torch.Tensor:
        """The parameter from ``read(cut)`` of each cut."""
        made = []
        for cuts in self.items:
            t = torch.cat([read(cut) for cut in cuts])
            if self.pad_rows is not None and t.shape[0] < self.pad_rows:
                t = torch.cat([t, t.new_zeros(self.pad_rows - t.shape[0], *t.shape[1:])])
            made.append(t)
        return torch.stack(made) if self.stacked else made[0]


def shard_params(c: ModelConfig, spec: ShardSpec, fused_qkv: bool = False,
                 fused_gate_up: bool = False, vocab_multiple: int = 64
                 ) -> dict[str, ShardParam]:
    """Every parameter of ``spec``'s shard and the cuts it is made of, for a checkpoint that
    spells q/k/v and gate/up split or fused."""
    t, r = spec.tp, spec.tp_rank
    one = lambda *cuts: ShardParam((tuple(cuts),))  # noqa: E731
    out: dict[str, ShardParam] = {}
    vocab_pad = padded_vocab_size(c.vocab_size, t, vocab_multiple)
    vs, ve = part(vocab_pad, t, r)
    vocab = (min(vs, c.vocab_size), min(ve, c.vocab_size))  # rows past the vocabulary: zero
    if spec.is_first:
        out["embed.weight"] = ShardParam(((Cut("model.embed_tokens.weight", vocab),),),
                                         pad_rows=ve - vs)
    qo, kvo, i = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    qs, qe = part(qo, t, r)
    ks, ke = part(kvo, t, r)
    start, end = split_layers(c.num_layers, spec.pp)[spec.pp_rank]
    for j, layer in enumerate(range(start, end)):
        p, q = f"model.layers.{layer}.", f"layers.{j}."
        for kind in ("weight", "bias") if c.qkv_bias else ("weight",):
            if fused_qkv:
                name = p + f"self_attn.qkv_proj.{kind}"
                cuts = (Cut(name, (qs, qe)), Cut(name, (qo + ks, qo + ke)),
                        Cut(name, (qo + kvo + ks, qo + kvo + ke)))
            else:
                cuts = (Cut(p + f"self_attn.q_proj.{kind}", (qs, qe)),
                        Cut(p + f"self_attn.k_proj.{kind}", (ks, ke)),
                        Cut(p + f"self_attn.v_proj.{kind}", (ks, ke)))
            out[q + f"qkv.{kind}"] = one(*cuts)  # [(Hq + 2 Hkv) D / TP, H]
        out[q + "o_proj.weight"] = one(Cut(p + "self_attn.o_proj.weight", cols=(qs, qe)))
        if c.is_moe_layer(layer):
            out.update(_experts(c, spec, p, q))
        else:
            s, e = part(i, t, r)
            if fused_gate_up:
                name = p + "mlp.gate_up_proj.weight"
                cuts = (Cut(name, (s, e)), Cut(name, (i + s, i + e)))
            else:
                cuts = (Cut(p + "mlp.gate_proj.weight", (s, e)),
                        Cut(p + "mlp.up_proj.weight", (s, e)))
            out[q + "gate_up.weight"] = one(*cuts)  # [2 I / TP, H]
            out[q + "down.weight"] = one(Cut(p + "mlp.down_proj.weight", cols=(s, e)))
        out[q + "input_norm.weight"] = one(Cut(p + "input_layernorm.weight"))
        out[q + "post_norm.weight"] = one(Cut(p + "post_attention_layernorm.weight"))
        if c.qk_norm:  # per head, so the same on every TP rank
            out[q + "q_norm.weight"] = one(Cut(p + "self_attn.q_norm.weight"))
            out[q + "k_norm.weight"] = one(Cut(p + "self_attn.k_norm.weight"))
    if spec.is_last:
        out["norm.weight"] = one(Cut("model.norm.weight"))
        head = "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight"
        out["lm_head.weight"] = ShardParam(((Cut(head, vocab),),), pad_rows=ve - vs)
    return out


def _experts(c: ModelConfig, spec: ShardSpec, p: str, q: str) -> dict[str, ShardParam]:
    """One MoE layer: its router (replicated) and this rank's experts (all, or its E
    group's), each cut to its TP slice, stacked."""
    block, gate, up, down = moe_names(c)
    s, e = part(c.expert_intermediate_size, spec.tp, spec.tp_rank)
    names = [p + f"{block}.experts.{x}." for x in spec.experts(c.num_experts)]
    return {
        q + "moe.router": ShardParam(((Cut(p + f"{block}.gate.weight"),),)),  # [E, H]
        q + "moe.gate_up": ShardParam(tuple(  # [E local, 2 I/TP, H]
            (Cut(n + f"{gate}.weight", (s, e)), Cut(n + f"{up}.weight", (s, e)))
            for n in names), stacked=True),
        q + "moe.down": ShardParam(tuple(  # [E local, H, I/TP]
            (Cut(n + f"{down}.weight", cols=(s, e)),) for n in names), stacked=True),
    }


@dataclass(frozen=True)
class Target:
    """Where one cut of a full HF tensor sits in a shard: ``shard[key][item]`` (stacked) or
    ``shard[key]``, rows ``[row, row + the cut's rows)``."""

    key: str
    item: int | None
    row: int
    cut: Cut


@functools.lru_cache(maxsize=16)
def update_targets(c: ModelConfig, spec: ShardSpec, vocab_multiple: int = 64
                   ) -> dict[str, list[Target]]:
    """HF name (split and fused spellings) -> every place its cuts sit in the shard."""
    out: dict[str, list[Target]] = {}
    for fused in (False, True):
        for key, param in shard_params(c, spec, fused, fused, vocab_multiple).items():
            for n, cuts in enumerate(param.items):
                row = 0  # a cut without a row range is its item's only cut
                for cut in cuts:
                    target = Target(key, n if param.stacked else None, row, cut)
                    if target not in out.setdefault(cut.name, []):
                        out[cut.name].append(target)
                    row += cut.rows[1] - cut.rows[0] if cut.rows else 0
    return out
