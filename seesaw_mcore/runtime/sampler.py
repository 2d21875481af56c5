"""Token sampling on the last pipeline stage: greedy, temperature, top-k, top-p, logprobs.

Randomness is a Gumbel draw from a generator seeded by ``(seed, step)``, so a completion's
tokens do not depend on batching, preemption or the parallel layout.
"""

from __future__ import annotations

import torch

from seesaw_mcore.engine.outputs import SampledToken, SamplingSpec

_MASK = float("-inf")


def sample(
    logits: torch.Tensor, seq_ids: list[int], specs: list[SamplingSpec]
) -> list[SampledToken]:
    """Samples one token per row.

    Args:
        logits: ``[N, V]`` float32 logits.
        seq_ids: sequence id per row.
        specs: sampling settings per row.
    """
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # [N] greedy by default
    for i, spec in enumerate(specs):
        if spec.temperature > 0:
            tokens[i] = _sample_row(logits[i], spec)
    out = [SampledToken(sid, int(t)) for sid, t in zip(seq_ids, tokens.tolist())]
    want = [i for i, s in enumerate(specs) if s.logprobs is not None]
    if want:
        logp = torch.log_softmax(logits[want], dim=-1)  # [M, V]
        for row, i in enumerate(want):
            out[i].logprob = float(logp[row, out[i].token_id])
            k = specs[i].logprobs
            if k:
                top = logp[row].topk(min(k, logp.shape[-1]))
                out[i].top_logprobs = dict(zip(top.indices.tolist(), top.values.tolist()))
    return out


def _sample_row(row: torch.Tensor, spec: SamplingSpec) -> int:
    scores = row / spec.temperature  # [V]
    if 0 < spec.top_k < scores.shape[-1]:
        kth = scores.topk(spec.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, _MASK)
    if spec.top_p < 1.0:
        sorted_scores, order = scores.sort(descending=True)
        probs = sorted_scores.softmax(-1)
        drop = probs.cumsum(-1) - probs >= spec.top_p  # keep the smallest set reaching top_p
        scores = scores.masked_fill(drop.scatter(0, order, drop), _MASK)
    gen = torch.Generator().manual_seed((spec.seed * 0x9E3779B1 + spec.step) % (2**63))
    u = torch.rand(scores.shape, generator=gen, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    gumbel = -torch.log(-torch.log(u))  # [V]
    return int((scores.double().cpu() + gumbel).argmax())
