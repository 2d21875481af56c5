"""Mistral: Llama with a sliding attention window (run exactly while every sequence fits)."""

from functools import partial

from seesaw_mcore.config.families.base import Family, hf_window

FAMILY = Family("MistralForCausalLM", "Mistral",
                window=partial(hf_window, needs_flag=False))
