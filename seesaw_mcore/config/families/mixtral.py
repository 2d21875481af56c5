"""Mixtral: Mistral with expert MLPs on every layer (``block_sparse_moe``, w1/w3/w2)."""

from functools import partial
from typing import Any

from seesaw_mcore.config.families.base import Family, MoENames, hf_window


def experts(hf: Any) -> dict[str, Any]:
    """``ModelConfig``'s expert fields of a Mixtral config (top-k weights renormalized)."""
    return dict(num_experts=int(hf.num_local_experts),
                num_experts_per_tok=int(hf.num_experts_per_tok),
                expert_intermediate_size=int(hf.intermediate_size), norm_topk_prob=True,
                moe_layers=tuple(range(int(hf.num_hidden_layers))))


FAMILY = Family("MixtralForCausalLM", "Mixtral",
                window=partial(hf_window, needs_flag=False), experts=experts,
                moe_names=MoENames("block_sparse_moe", "w1", "w3", "w2"))
