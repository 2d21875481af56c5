"""What returned logprobs are of (``logprobs_mode``): the raw logits' log-softmax, or the
distribution a row is drawn from - penalties, temperature, top-k, top-p, min-p applied over
the whole vocabulary (``process_logits``) - as logprobs or as logits; and the rows of values
(chosen token, its rank, the top k) that reach the host in one transfer. ``nucleus`` (a
top-p set without sorting the vocabulary) is shared with the sampler's draw."""

from __future__ import annotations

import torch

from seesaw_mcore.runtime.sampling_batch import SamplingBatch

NUCLEUS_BITS = 13  # a probability's sign, exponent and 4 mantissa bits: 8,192 bins


def process_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The distribution each row is sampled from, as logits (vLLM's ``processed_logits``):
    sampled rows divided by their temperature, tokens outside their top-k, top-p nucleus
    (of the top-k renormalized, as the draw applies them) or min-p set to ``-inf``; greedy
    rows as given. Computed over the whole vocabulary (``logprobs_mode`` processed only).

    Args:
        logits: ``[N, V]`` float32 logits (penalties applied).
        batch: the rows' settings.

    Returns:
        ``[N, V]`` float32.
    """
    if not batch.any_random:  # every row greedy: nothing to apply
        return logits
    vocab = logits.shape[1]
    sampled = batch.temperature > 0  # [N]
    scores = logits / torch.where(sampled, batch.temperature, 1.0).unsqueeze(1)  # [N, V]
    k = torch.where(sampled & (batch.top_k > 0), batch.top_k.clamp(max=vocab), vocab)  # [N]
    if bool((k < vocab).any()):
        kth = scores.topk(int(k.max()), dim=-1).values.gather(1, (k - 1).unsqueeze(1))  # [N, 1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = scores.softmax(dim=-1)  # [N, V] over each row's top-k
    keep = nucleus(probs, torch.where(sampled, batch.top_p, 1.0))
    keep &= probs >= (batch.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True))
    keep |= ~sampled.unsqueeze(1)  # greedy rows: every token
    return scores.masked_fill(~keep, float("-inf"))


def logprob_source(logits: torch.Tensor, mode: str, batch: SamplingBatch | None
                   ) -> torch.Tensor:
    """``[N, V]`` the values returned as logprobs under ``mode`` (``LOGPROBS_MODES``), from
    raw ``logits`` (processed modes: with penalties applied) and the rows' settings."""
    if mode.startswith("processed"):
        logits = process_logits(logits, batch)
    return logits if mode.endswith("logits") else torch.log_softmax(logits, dim=-1)


def logprob_rows(values: torch.Tensor, chosen_ids: torch.Tensor, k: int) -> list[list[float]]:
    """Per row: the chosen token's value and rank and the top ``k``, in one device -> host
    transfer.

    Args:
        values: ``[N, V]`` logprobs (or logits: ``logprobs_mode``).
        chosen_ids: ``[N]`` int64 the token each row reports on.
        k: top alternatives per row.

    Returns:
        ``N`` rows ``[id, value, rank, k top ids, k top values]``.
    """
    chosen = values.gather(1, chosen_ids.unsqueeze(1))  # [N, 1]
    rank = (values > chosen).sum(dim=1, keepdim=True) + 1  # [N, 1]
    cols = [chosen_ids.double().unsqueeze(1), chosen.double(), rank.double()]
    k = min(k, values.shape[-1])
    if k:
        top = values.topk(k, dim=-1)  # [N, k]
        cols += [top.indices.double(), top.values.double()]
    return torch.cat(cols, dim=1).tolist()


def nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` bool: each row's top-p nucleus - tokens in descending probability (ties:
    lower id first) while the mass before them is below ``top_p`` - found without sorting the
    vocabulary: non-negative floats order as their bits, so a histogram of the high bits
    (``NUCLEUS_BITS``: sign, exponent and a few mantissa bits) finds the bin where the mass
    crosses ``top_p``; bins above it are kept, bins below
    dropped, and only the crossing bin's few tokens are sorted. Masses in float64.

    Args:
        probs: ``[N, V]`` float32 probabilities.
        top_p: ``[N]`` (1: every token).
    """
    n = probs.shape[0]
    bits = probs.view(torch.int32)  # [N, V], >= 0
    hi = (bits >> (32 - NUCLEUS_BITS)).long()  # [N, V] bins
    p64 = probs.double()
    mass = torch.zeros(n, 1 << NUCLEUS_BITS, dtype=torch.float64, device=probs.device)
    mass.scatter_add_(1, hi, p64)  # [N, B]
    incl = mass.flip(1).cumsum(1).flip(1)  # [N, B] mass of bins >= b
    want = top_p.double().unsqueeze(1)  # [N, 1]
    cross = (incl >= want).sum(1) - 1  # [N] the last bin whose upper mass reaches top_p
    keep = hi > cross.unsqueeze(1)  # [N, V]
    edge = hi == cross.unsqueeze(1)  # [N, V] the crossing bin's tokens
    r, c = edge.nonzero(as_tuple=True)  # row-major: ids ascending within a row
    if r.numel():
        key = (r << 32) | (0x7FFFFFFF - bits[r, c]).long()  # row, then probability desc
        order = key.sort(stable=True).indices  # (stable: lower ids first among ties)
        r, c = r[order], c[order]
        p = p64[r, c]
        before = p.cumsum(0) - p  # [M] over the rows' runs; minus each run's start:
        start = torch.searchsorted(r, r)  # [M] first index of each element's row
        before = before - before[start]
        above = incl[r, cross[r]] - mass[r, cross[r]]  # mass of the bins above
        kept = above + before < want[r, 0]
        keep[r[kept], c[kept]] = True
    return keep | (top_p >= 1).unsqueeze(1)
