"""Prompt logprobs (``SamplingParams.prompt_logprobs``): every prompt position's logprob of
the actual next token, its rank and the top ``k``, computed in chunks at a sequence's
first prefill."""

from __future__ import annotations

from collections.abc import Callable

import torch

from seesaw_mcore import h2d
from seesaw_mcore.contract import SampledToken, ScheduledSeq

PROMPT_CHUNK = 1024  # prompt positions whose [rows, V] log-softmax is held at once


def prompt_logprob_rows(logits: torch.Tensor, actual: torch.Tensor, k: int) -> list[list[float]]:
    """Per row: the logprob and rank of the actual next token and the top ``k``, in one
    device -> host transfer.

    Args:
        logits: ``[R, V]`` logits at prompt positions ``0 .. R-1``.
        actual: ``[R]`` int64 the prompt's tokens at positions ``1 .. R``.
        k: top alternatives per row.

    Returns:
        ``R`` rows ``[actual id, logprob, rank, k top ids, k top logprobs]``.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    chosen = logp.gather(1, actual.unsqueeze(1))  # [R, 1]
    rank = (logp > chosen).sum(dim=1, keepdim=True) + 1  # [R, 1]
    cols = [actual.double().unsqueeze(1), chosen.double(), rank.double()]
    k = min(k, logp.shape[1])
    if k:
        top = logp.topk(k, dim=-1)  # [R, k]
        cols += [top.indices.double(), top.values.double()]
    return torch.cat(cols, dim=1).tolist()


def attach_prompt_logprobs(logits: Callable[[torch.Tensor], torch.Tensor],
                           seqs: list[ScheduledSeq], hidden: torch.Tensor,
                           tokens: list[SampledToken | None], keep: bool) -> None:
    """For the sequences of a micro-batch that ask: every prompt position's rows, in chunks
    of ``PROMPT_CHUNK``, on their sampled token (``SampledToken.prompt_rows``).

    Args:
        logits: hidden states ``[m, H]`` -> logits ``[m, V]`` (gathers over the TP group,
            so every TP rank calls this).
        seqs: the micro-batch's sequences, in ``hidden``'s order.
        hidden: ``[T, H]`` the micro-batch's final hidden states.
        tokens: each sequence's sampled token (``None`` on ranks that do not sample).
        keep: whether this rank keeps the rows (TP rank 0).
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
                rows += prompt_logprob_rows(chunk, actual[c:c + m], k)
        if tokens[i] is not None:
            tokens[i].prompt_rows = rows
