"""Qwen2: Llama with q/k/v biases; its window only with ``use_sliding_window``."""

from functools import partial

from seesaw_mcore.config.families.base import Family, hf_window

FAMILY = Family("Qwen2ForCausalLM", "Qwen2", qkv_bias=True,
                window=partial(hf_window, needs_flag=True))
