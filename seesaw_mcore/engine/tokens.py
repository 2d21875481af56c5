"""Applying a step's sampled tokens to their sequences (rank 0): the token, its logprobs
and prompt logprobs as vLLM returns them, and the token-level stops (with the ids
``min_tokens`` bans until then)."""

from __future__ import annotations

from seesaw_mcore.contract import SampledToken
from seesaw_mcore.engine.request import Logprob, Sequence
from seesaw_mcore.sampling_params import SamplingParams


def append_token(seq: Sequence, tok: SampledToken) -> None:
    """Adds ``tok`` to ``seq``: the token, its logprob entry (the sampled token first, as
    vLLM) when asked, and the prompt logprobs a first prefill brings."""
    seq.output_token_ids.append(tok.token_id)
    if seq.params.logprobs is not None:
        entry = {tok.token_id: Logprob(tok.logprob, tok.rank)}
        for r, (tid, lp) in enumerate(tok.top_logprobs.items(), 1):
            entry.setdefault(tid, Logprob(lp, r))
        seq.logprobs.append(entry)
        seq.cumulative_logprob += tok.logprob
    if tok.prompt_rows is not None:
        seq.prompt_logprobs = _prompt_entries(seq, tok.prompt_rows)


def min_tokens_banned(params: SamplingParams, eos_token_ids: set[int],
                      vocab_size: int) -> tuple[int, ...]:
    """The ids that may not end a sequence before ``params.min_tokens`` (its stop tokens and,
    unless ``ignore_eos``, EOS): the sampler bans them until then. Empty without it."""
    if not params.min_tokens:
        return ()
    ids = set(params.stop_token_ids) | (set() if params.ignore_eos else eos_token_ids)
    return tuple(sorted(i for i in ids if 0 <= i < vocab_size))


def token_stop(seq: Sequence, eos_token_ids: set[int], max_model_len: int) -> bool:
    """Token-level stops after the last token: a stop token, EOS, ``max_tokens``, the
    model's context. Sets ``finish_reason`` (and ``stop_reason``); returns whether it
    stopped."""
    p, tok = seq.params, seq.output_token_ids[-1]
    if tok in p.stop_token_ids:
        seq.finish_reason, seq.stop_reason = "stop", tok
    elif not p.ignore_eos and tok in eos_token_ids:
        seq.finish_reason = "stop"
    elif len(seq.output_token_ids) >= seq.max_tokens or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"
    return seq.finish_reason is not None


def _prompt_entries(seq: Sequence, rows: list[list[float]]) -> list[dict[int, Logprob] | None]:
    """Per prompt position, its logprob entry (``None`` for the first position and before
    ``prompt_logprobs_from``). ``rows`` cover the positions after the prefill's cached
    prefix, up to the last."""
    first = len(seq.prompt_token_ids) - len(rows)
    start = seq.params.prompt_logprobs_from
    return [None] * first + [_logprob_entry(r) if first + i >= start else None
                             for i, r in enumerate(rows)]


def _logprob_entry(row: list[float]) -> dict[int, Logprob]:
    """``[actual id, logprob, rank, k ids, k logprobs]`` -> ``{id: Logprob}``, the actual
    token first (vLLM's prompt-logprob entry)."""
    k = (len(row) - 3) // 2
    entry = {int(row[0]): Logprob(row[1], int(row[2]))}
    for r, (tid, lp) in enumerate(zip(row[3:3 + k], row[3 + k:]), 1):
        entry.setdefault(int(tid), Logprob(lp, r))
    return entry
