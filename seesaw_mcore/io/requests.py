"""What ``LLM`` reads besides the engine: a model folder's tokenizer and EOS ids, the
prompts of a ``generate`` call with their ``SamplingParams`` and ids, each prompt's checked
token ids, and each sample's seed."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator

from seesaw_mcore.errors import SeesawError
from seesaw_mcore.sampling_params import SamplingParams

PromptType = str | dict


def requests_of(prompts: Iterable[PromptType], sampling_params, request_ids
              ) -> Iterator[tuple[int, str, PromptType, SamplingParams]]:
    """``(index, id, prompt, params)`` per prompt, lazily; ``sampling_params`` and
    ``request_ids`` may be single values (params), sequences or iterators."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        params = itertools.repeat(sampling_params or SamplingParams())
    else:
        params = iter(sampling_params)
    ids = itertools.count() if request_ids is None else iter(request_ids)
    for i, prompt in enumerate(prompts):
        p, rid = next(params, None), next(ids, None)
        if p is None or rid is None:
            raise SeesawError(f"fewer {'SamplingParams' if p is None else 'request ids'} "
                              f"than prompts (prompt {i} has none)")
        if not isinstance(p, SamplingParams):
            raise SeesawError(f"prompt {i}: expected SamplingParams, got {type(p).__name__}")
        yield i, str(rid), prompt, p


def load_tokenizer(path: str):
    """The folder's transformers tokenizer (``None`` when it has none)."""
    if not os.path.exists(os.path.join(path, "tokenizer.json")) and not os.path.exists(
            os.path.join(path, "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def eos_ids(path: str, tokenizer) -> set[int]:
    """EOS ids besides the model config's: ``generation_config.json``'s and the
    tokenizer's."""
    ids: set[int] = set()
    gen = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def prompt_tokens(label: str, prompt: PromptType, tokenizer, model) -> list[int]:
    """``prompt``'s token ids (text through ``tokenizer``; ids checked against ``model``'s
    vocabulary), or a one-line error naming it by ``label``."""
    if isinstance(prompt, dict):
        toks = prompt.get("prompt_token_ids")
        if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
            raise SeesawError(f"{label}: 'prompt_token_ids' must be a list of ints")
        vocab = model.vocab_size
        bad = [t for t in toks if not 0 <= t < vocab]
        if bad:
            raise SeesawError(f"{label}: token id {bad[0]} is outside the vocabulary "
                              f"[0, {vocab})")
    elif isinstance(prompt, str):
        if tokenizer is None:
            raise SeesawError(f"{label} is text but {model.path} has no "
                              "tokenizer; pass {'prompt_token_ids': [...]}")
        toks = tokenizer(prompt)["input_ids"] if prompt else []
    else:
        raise SeesawError(f"{label} must be a string or a dict with 'prompt_token_ids', "
                          f"got {type(prompt).__name__}")
    if not toks:
        raise SeesawError(f"{label} is empty")
    return list(toks)
