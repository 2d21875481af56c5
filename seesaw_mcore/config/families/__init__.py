"""Model families, one module each, registered by HF architecture name.

A family module says what differs between the decoders ``model/llama.py`` runs: its config
facts (q/k/v biases, per-head q/k norms, sliding windows, experts), its HF parameter names
(the MoE block's). Adding a family means adding a module here and listing it in
``FAMILIES``; nothing else branches on the architecture name.
"""

from __future__ import annotations

from seesaw_mcore.config.families import llama, mistral, mixtral, qwen2, qwen3, qwen3_moe
from seesaw_mcore.config.families.base import Family, MoENames

__all__ = ["FAMILIES", "SUPPORTED_ARCHITECTURES", "Family", "MoENames", "family_names",
           "family_of"]

# in the order users read them (errors, the README)
FAMILIES: dict[str, Family] = {m.FAMILY.architecture: m.FAMILY for m in (
    llama, qwen2, qwen3, mistral, qwen3_moe, mixtral)}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


def family_of(architecture: str) -> Family:
    """The family of an architecture (``KeyError`` if none is registered)."""
    return FAMILIES[architecture]


def family_names() -> str:
    """The families for a sentence: "Llama, Qwen2, ... and Mixtral"."""
    names = [f.name for f in FAMILIES.values()]
    return ", ".join(names[:-1]) + " and " + names[-1]
