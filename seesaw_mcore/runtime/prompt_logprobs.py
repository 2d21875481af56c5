"""Prompt logprobs (``SamplingParams.prompt_logprobs``): every prompt position's logprob of
the actual next token, its rank and the top ``k``, computed in chunks at a sequence's
first prefill."""

from __future__ import annotations

from collections.abc import Callable

import torch

from seesaw_mcore import h2d
from seesaw_mcore.contract import SampledToken, SamplingSpec, ScheduledSeq
from seesaw_mcore.runtime.logprobs import logprob_rows, logprob_source
from seesaw_mcore.runtime.sampling_batch import SamplingBatch

PROMPT_CHUNK = 1024  # prompt positions whose [rows, V] log-softmax is held at once


def prompt_logprob_rows(logits: torch.Tensor, actual: torch.Tensor, k: int,
                        mode: str = "raw_logprobs", spec: SamplingSpec | None = None
                        ) -> list[list[float]]:
    """Per row: the logprob and rank of the actual next token and the top ``k``, in one
    device -> host transfer.

    Args:
        logits: ``[R, V]`` logits at prompt positions ``0 .. R-1``.
        actual: ``[R]`` int64 the prompt's tokens at positions ``1 .. R``.
        k: top alternatives per row.
        mode: ``logprobs_mode``; processed modes apply the request's temperature and
            top-k / top-p / min-p to every position (not penalties: they follow a
            completion's history).
        spec: the request's sampling settings (processed modes).

    Returns:
        ``R`` rows ``[actual id, logprob, rank, k top ids, k top logprobs]``.
    """
    logits = logits.float()
    batch = None
    if mode.startswith("processed"):
        batch = SamplingBatch.build([spec] * logits.shape[0], logits.device)
    return logprob_rows(logprob_source(logits, mode, batch), actual, k)


def attach_prompt_logprobs(logits: Callable[[torch.Tensor], torch.Tensor],
                           seqs: list[ScheduledSeq], hidden: torch.Tensor,
                           tokens: list[SampledToken | None], keep: bool,
                           mode: str = "raw_logprobs") -> None:
    """For the sequences of a micro-batch that ask: every prompt position's rows, in chunks
    of ``PROMPT_CHUNK``, on their sampled token (``SampledToken.prompt_rows``).

    Args:
        logits: hidden states ``[m, H]`` -> logits ``[m, V]`` (gathers over the TP group,
            so every TP rank calls this).
        seqs: the micro-batch's sequences, in ``hidden``'s order.
        hidden: ``[T, H]`` the micro-batch's final hidden states.
        tokens: each sequence's sampled token (``None`` on ranks that do not sample).
        keep: whether this rank keeps the rows (TP rank 0).
        mode: ``logprobs_mode``.
    """
    start = 0  # the sequence's first row in ``hidden``: offsets from the host, no sync
    for i, s in enumerate(seqs):
        start, first = start + len(s.token_ids), start
        k = s.sampling.prompt_logprobs
        if k is None:
            continue
        rows: list[list[float]] = []
        n = len(s.token_ids) - 1
        actual = h2d.tensor(s.token_ids[1:], torch.long, hidden.device)
        for c in range(0, n, PROMPT_CHUNK):
            m = min(PROMPT_CHUNK, n - c)
            chunk = logits(hidden[first + c:first + c + m])  # [m, V]
            if keep:
                rows += prompt_logprob_rows(chunk, actual[c:c + m], k, mode, s.sampling)
        if tokens[i] is not None:
            tokens[i].prompt_rows = rows
