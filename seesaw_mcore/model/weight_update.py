"""New full HF tensors -> the slices a rank's shard holds (``LLM.update_weights``): every
pair checked against the model's names and shapes first, then each written into a shard
exactly as ``loader.load_shard`` cut it."""

from __future__ import annotations

import torch

from seesaw_mcore.config import ModelConfig, padded_vocab_size, split_layers
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model.hf_names import hf_shapes, moe_names, part
from seesaw_mcore.model.loader import ShardSpec


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
    """Writes this rank's slice of the HF tensor ``name`` into ``shard`` (a ``load_shard``
    state dict) in place, exactly where ``load_shard`` would have put it.

    Returns:
        The shard's parameter names written (none when the tensor is not this rank's).
    """
    t, r = spec.tp, spec.tp_rank
    qo, kvo, i = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.intermediate_size
    written: list[str] = []

    def put(key: str, value: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        dst = shard[key] if rows is None else shard[key][rows[0]:rows[1]]
        dst.copy_(value)
        written.append(key)

    def vocab(key: str) -> None:
        start, end = part(padded_vocab_size(c.vocab_size, t, vocab_multiple), t, r)
        rows = full[min(start, c.vocab_size):min(end, c.vocab_size)]  # padding rows stay 0
        put(key, rows, (0, rows.shape[0]))

    if name == "model.embed_tokens.weight":
        if spec.is_first:
            vocab("embed.weight")
        if spec.is_last and c.tie_word_embeddings:
            vocab("lm_head.weight")
        return written
    if name in ("lm_head.weight", "model.norm.weight"):
        if spec.is_last and name == "lm_head.weight":
            vocab("lm_head.weight")
        elif spec.is_last:
            put("norm.weight", full)
        return written
    parts = name.split(".")  # model.layers.L.<module>.<param>
    layer, rest = int(parts[2]), ".".join(parts[3:])
    start, end = split_layers(c.num_layers, spec.pp)[spec.pp_rank]
    if not start <= layer < end:
        return written
    q = f"layers.{layer - start}."
    kind = rest.rsplit(".", 1)[1]  # weight / bias
    qs, qe = part(qo, t, r)
    ks, ke = part(kvo, t, r)
    lq, lkv = qo // t, kvo // t  # local rows of q and of k (and v)
    if c.is_moe_layer(layer) and rest.split(".")[0] == moe_names(c)[0]:
        key = _update_expert(shard, q, c, rest, full, spec)
        return [key] if key is not None else []
    if rest.startswith("self_attn.q_proj."):
        put(q + f"qkv.{kind}", full[qs:qe], (0, lq))
    elif rest.startswith("self_attn.k_proj."):
        put(q + f"qkv.{kind}", full[ks:ke], (lq, lq + lkv))
    elif rest.startswith("self_attn.v_proj."):
        put(q + f"qkv.{kind}", full[ks:ke], (lq + lkv, lq + 2 * lkv))
    elif rest.startswith("self_attn.qkv_proj."):
        put(q + f"qkv.{kind}", torch.cat([full[qs:qe], full[qo + ks:qo + ke],
                                          full[qo + kvo + ks:qo + kvo + ke]]))
    elif rest == "self_attn.o_proj.weight":
        put(q + "o_proj.weight", full[:, qs:qe])
    elif rest == "mlp.gate_proj.weight":
        put(q + "gate_up.weight", full[slice(*part(i, t, r))], (0, i // t))
    elif rest == "mlp.up_proj.weight":
        put(q + "gate_up.weight", full[slice(*part(i, t, r))], (i // t, 2 * i // t))
    elif rest == "mlp.gate_up_proj.weight":
        s_, e_ = part(i, t, r)
        put(q + "gate_up.weight", torch.cat([full[s_:e_], full[i + s_:i + e_]]))
    elif rest == "mlp.down_proj.weight":
        put(q + "down.weight", full[:, slice(*part(i, t, r))])
    elif rest == "input_layernorm.weight":
        put(q + "input_norm.weight", full)
    elif rest == "post_attention_layernorm.weight":
        put(q + "post_norm.weight", full)
    elif rest in ("self_attn.q_norm.weight", "self_attn.k_norm.weight"):
        put(q + rest.split(".")[1] + ".weight", full)
    return written


def _update_expert(shard: dict[str, torch.Tensor], q: str, c: ModelConfig, rest: str,
                   full: torch.Tensor, spec: ShardSpec) -> str | None:
    """Writes an MoE block's HF tensor (``<block>.gate.weight`` or
    ``<block>.experts.E.<gate|up|down>.weight``) into the stacked shard tensors; returns
    the shard key written (``None``: an expert this rank does not hold)."""
    block, gate, up, down = moe_names(c)
    if rest == f"{block}.gate.weight":
        shard[q + "moe.router"].copy_(full)
        return q + "moe.router"
    parts = rest.split(".")  # <block>.experts.E.<proj>.weight
    mine = spec.experts(c.num_experts)
    if int(parts[2]) not in mine:
        return None
    e, proj = int(parts[2]) - mine.start, parts[3]
    s, end = part(c.expert_intermediate_size, spec.tp, spec.tp_rank)
    n = end - s
    if proj == down:
        shard[q + "moe.down"][e].copy_(full[:, s:end])
        return q + "moe.down"
    at = 0 if proj == gate else n
    shard[q + "moe.gate_up"][e, at:at + n].copy_(full[s:end])
    return q + "moe.gate_up"
