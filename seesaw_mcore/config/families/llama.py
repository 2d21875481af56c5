"""Llama 2/3: the reference decoder (no biases, no q/k norms, dense, unwindowed)."""

from seesaw_mcore.config.families.base import Family

FAMILY = Family("LlamaForCausalLM", "Llama")
