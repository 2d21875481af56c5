"""Qwen3: Llama with a per-head RMSNorm of q and k before RoPE."""

from functools import partial

from seesaw_mcore.config.families.base import Family, hf_window

FAMILY = Family("Qwen3ForCausalLM", "Qwen3", qk_norm=True,
                window=partial(hf_window, needs_flag=True))
