"""Qwen3-MoE: Qwen3 with expert MLPs where ``decoder_sparse_step`` / ``mlp_only_layers`` say."""

from functools import partial
from typing import Any

from seesaw_mcore.config.families.base import Family, hf_window


def moe_layers(num_layers: int, experts: int, sparse_step: int | None,
               dense_layers: list[int] | None) -> tuple[int, ...]:
    """Qwen3-MoE's rule for which layers are MoE: every ``decoder_sparse_step``-th one not
    in ``mlp_only_layers`` (none without experts)."""
    step, dense = int(sparse_step or 1), set(dense_layers or [])
    return tuple(i for i in range(num_layers)
                 if experts > 0 and i not in dense and (i + 1) % step == 0)


def experts(hf: Any) -> dict[str, Any]:
    """``ModelConfig``'s expert fields of a Qwen3-MoE config."""
    n = int(hf.num_experts)
    return dict(num_experts=n, num_experts_per_tok=int(hf.num_experts_per_tok),
                expert_intermediate_size=int(hf.moe_intermediate_size),
                norm_topk_prob=bool(getattr(hf, "norm_topk_prob", True)),
                moe_layers=moe_layers(int(hf.num_hidden_layers), n,
                                      getattr(hf, "decoder_sparse_step", 1),
                                      getattr(hf, "mlp_only_layers", None)))


FAMILY = Family("Qwen3MoeForCausalLM", "Qwen3-MoE", qk_norm=True,
                window=partial(hf_window, needs_flag=True), experts=experts)
