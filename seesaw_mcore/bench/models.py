"""Random-weight HF checkpoints of every supported family, built locally (nothing is
downloaded): the models the benchmarks and the tests run (GQA, uneven layer counts, Qwen2
with tied embeddings, Qwen3, Qwen3-MoE, Mixtral, Mistral's sliding window, Llama-3 rope
scaling). ``tools/make_tiny.py`` builds the trained demo model.
"""

from __future__ import annotations

import torch


def build_random(
    path: str,
    arch: str = "llama",
    num_layers: int = 3,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 250,
    tie: bool = False,
    rope_scaling: dict | None = None,
    init_std: float = 0.15,
    seed: int = 0,
    max_shard_size: str | None = None,
    max_positions: int = 512,
    head_dim: int | None = None,
    sliding_window: int | None = None,
    experts: int = 4,
) -> str:
    """Saves a random-weight ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` /
    ``Qwen3ForCausalLM`` / ``MistralForCausalLM`` / ``Qwen3MoeForCausalLM`` /
    ``MixtralForCausalLM`` folder at ``path``.

    ``init_std`` is large compared with HF's default so logits have clear margins (greedy
    parity is then not decided by float rounding).
    """
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=tie,
        initializer_range=init_std, bos_token_id=1, eos_token_id=2,
    )
    if head_dim is not None:
        common["head_dim"] = head_dim
    if arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=1e6, **common))
    elif arch == "qwen3":  # q/k norms; head_dim need not be hidden / heads
        model = Qwen3ForCausalLM(Qwen3Config(rope_theta=1e6, **common))
    elif arch == "qwen3_moe":  # top 2 of ``experts``; layer 1 dense (mlp_only_layers)
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            rope_theta=1e6, num_experts=experts, num_experts_per_tok=2,
            moe_intermediate_size=intermediate // 2, mlp_only_layers=[1], norm_topk_prob=True,
            **common))
    elif arch == "mixtral":  # every layer MoE, top 2 of ``experts``
        model = MixtralForCausalLM(MixtralConfig(
            num_local_experts=experts, num_experts_per_tok=2, **common))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common))
    else:
        extra = {}
        if rope_scaling:
            extra["rope_parameters"] = {"rope_theta": 500000.0, **rope_scaling}
        model = LlamaForCausalLM(LlamaConfig(**common, **extra))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path
