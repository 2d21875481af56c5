"""HF parameter names and shapes of a model (every supported family, split and fused
spellings), and the tensor-parallel split both the loader and weight updates cut by."""

from __future__ import annotations

from seesaw_mcore.config import ModelConfig


def part(n: int, tp: int, rank: int) -> tuple[int, int]:
    size = n // tp
    return rank * size, (rank + 1) * size


def moe_names(c: ModelConfig) -> tuple[str, str, str, str]:
    """The HF names of an MoE block: (block, expert gate, expert up, expert down)."""
    n = c.family.moe_names
    return n.block, n.gate, n.up, n.down


def hf_shapes(c: ModelConfig, fused_qkv: bool, fused_gate_up: bool) -> dict[str, tuple[int, ...]]:
    """Every HF parameter name of the model and its full shape (split or fused projections)."""
    h, d, i = c.hidden_size, c.head_dim, c.intermediate_size
    qo, kvo = c.num_heads * d, c.num_kv_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for layer in range(c.num_layers):
        p = f"model.layers.{layer}."
        if fused_qkv:
            shapes[p + "self_attn.qkv_proj.weight"] = (qo + 2 * kvo, h)
        else:
            shapes.update({p + "self_attn.q_proj.weight": (qo, h),
                           p + "self_attn.k_proj.weight": (kvo, h),
                           p + "self_attn.v_proj.weight": (kvo, h)})
        if c.qkv_bias and fused_qkv:
            shapes[p + "self_attn.qkv_proj.bias"] = (qo + 2 * kvo,)
        elif c.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (qo,),
                           p + "self_attn.k_proj.bias": (kvo,),
                           p + "self_attn.v_proj.bias": (kvo,)})
        shapes[p + "self_attn.o_proj.weight"] = (h, qo)
        if c.is_moe_layer(layer):
            block, gate, up, down = moe_names(c)
            ie = c.expert_intermediate_size
            shapes[p + f"{block}.gate.weight"] = (c.num_experts, h)
            for e in range(c.num_experts):
                x = p + f"{block}.experts.{e}."
                shapes.update({x + f"{gate}.weight": (ie, h), x + f"{up}.weight": (ie, h),
                               x + f"{down}.weight": (h, ie)})
        elif fused_gate_up:
            shapes[p + "mlp.gate_up_proj.weight"] = (2 * i, h)
            shapes[p + "mlp.down_proj.weight"] = (h, i)
        else:
            shapes.update({p + "mlp.gate_proj.weight": (i, h),
                           p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)})
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        if c.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
    shapes["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    return shapes
