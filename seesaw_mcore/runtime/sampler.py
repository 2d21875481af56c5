"""Token sampling on the last pipeline stage, batched on the device.

One pass over the step's ``[N, V]`` logits: rows with penalties or banned ids (``min_tokens``)
first get them applied (one scatter over the step's token histories); greedy rows by argmax;
sampled rows by temperature, then top-k, top-p and min-p (per-row tensors, at most one sort
per step, over the top ``CANDIDATES`` tokens when they hold every row's nucleus), then a
Gumbel-max draw; logprobs of every row in one ``log_softmax``; one device -> host transfer
of the step's tokens (and logprobs). The O(steps) work does not grow with the batch.

Randomness is counter-based: the Gumbel noise of row ``r`` at vocab index ``v`` is a hash of
``(seed_r, token_index_r, v)`` computed on the device (splitmix64), so a completion's tokens do not
depend on the batch it runs in, the parallel layout, or preemption.
"""

from __future__ import annotations

import torch

from seesaw_mcore import h2d
from seesaw_mcore.contract import SampledToken, SamplingSpec
from seesaw_mcore.runtime.logprobs import logprob_rows, logprob_source, nucleus
from seesaw_mcore.runtime.sampling_batch import SamplingBatch

_M64 = (1 << 64) - 1
# Top-p / min-p without top-k: the most likely tokens looked at first; when they hold every
# row's nucleus (almost always with a trained model), no sort of the whole vocabulary.
CANDIDATES = 1024


def _i64(x: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits."""
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _i64(0x9E3779B97F4A7C15)
_MIX1 = _i64(0xBF58476D1CE4E5B9)
_MIX2 = _i64(0x94D049BB133111EB)
_STEP = _i64(0xD1B54A32D192ED03)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (multiplication wraps mod 2**64)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab_ids: torch.Tensor
                  ) -> torch.Tensor:
    """Counter-based uniforms in (0, 1).

    Args:
        seed: ``[N]`` int64 per-row seeds.
        step: ``[N]`` int64 index of the token being drawn in its completion.
        vocab_ids: ``[V]`` (every row) or ``[N, K]`` (per row) int64 vocabulary indices.

    Returns:
        ``[N, V]`` or ``[N, K]`` float32, each a function of ``(seed, step, vocab id)`` only.
    """
    key = _mix(_mix(seed * _GOLDEN + step * _STEP))  # [N]
    bits = _mix(key.unsqueeze(1) + vocab_ids * _GOLDEN)  # [N, V] or [N, K]
    return (_shr(bits, 40).float() + 0.5) * (1.0 / (1 << 24))  # 24 random bits


def _gumbel(batch: "SamplingBatch", vocab_ids: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform_noise(batch.seed, batch.token_index, vocab_ids)))


def sample_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Next token per row, on the device.

    Args:
        logits: ``[N, V]`` float32 logits.
        batch: the rows' settings.

    Returns:
        ``[N]`` int64 token ids.
    """
    greedy = logits.argmax(dim=-1)  # [N]
    if not batch.any_random:
        return greedy
    n, vocab = logits.shape
    temp = batch.temperature.clamp_min(1e-6).unsqueeze(1)  # [N, 1]
    scores = logits / temp  # [N, V]
    if not batch.any_filter:
        vocab_ids = torch.arange(vocab, device=logits.device)  # [V]
        drawn = (scores + _gumbel(batch, vocab_ids)).argmax(dim=-1)  # [N]
        return torch.where(batch.temperature > 0, drawn, greedy)
    full = None  # [N, K] full-vocabulary probabilities of the kept columns (no top-k rows)
    if 0 < batch.all_top_k < vocab:  # every sampled row keeps <= K tokens: no full sort
        scores, order = scores.topk(batch.all_top_k, dim=-1)  # [N, K] each, descending
    else:
        cand = _candidates(scores, batch, sort=batch.any_top_k)
        if cand is None:  # top-p / min-p rows whose nuclei the candidates miss: no sort
            return _sample_masked(scores, batch, greedy)
        scores, order, full = cand
    rank = torch.arange(scores.shape[1], device=logits.device)  # [K]
    k = torch.where(batch.top_k > 0, batch.top_k, vocab).unsqueeze(1)  # [N, 1]
    scores = scores.masked_fill(rank >= k, float("-inf"))  # top-k
    probs = scores.softmax(dim=-1)  # [N, K] (top-k rows: renormalized over their k)
    if full is not None:
        probs = torch.where((batch.top_k > 0).unsqueeze(1), probs, full)
    drop = probs.cumsum(dim=-1) - probs >= batch.top_p.unsqueeze(1)  # top-p
    drop |= probs < batch.min_p.unsqueeze(1) * probs[:, :1]  # min-p (of the max)
    drop[:, 0] = False  # the most likely token always stays
    scores = scores.masked_fill(drop, float("-inf"))
    pick = (scores + _gumbel(batch, order)).argmax(dim=-1, keepdim=True)  # [N, 1]
    drawn = order.gather(1, pick).squeeze(1)  # [N]
    return torch.where(batch.temperature > 0, drawn, greedy)


def _candidates(scores: torch.Tensor, batch: SamplingBatch, sort: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Rows' tokens in descending order, as far as the filters can keep any: the top
    ``CANDIDATES`` when, for every sampled row, they hold all a filter can keep (top-k with
    k <= CANDIDATES, the top-p nucleus, or every token above min-p), else (``sort``) the
    full sort, or ``None``.

    Returns:
        ``(scores, order, full)``: ``[N, K]`` sorted scores and their vocab ids, and the
        full-vocabulary probabilities of those columns (``None`` after a full sort).
    """
    vocab = scores.shape[1]
    sampled = batch.temperature > 0
    probs = scores.softmax(dim=-1) if CANDIDATES < vocab else None  # [N, V]
    # a nucleus needs at least top_p / max prob tokens: a flat row cannot fit. Checked
    # first on CPU ranks only, where a sync is free and a wasted top-k is not.
    flat = probs is not None and probs.device.type == "cpu" and bool((
        sampled & (batch.top_k <= 0) & (batch.top_p < 1)
        & (batch.top_p > CANDIDATES * probs.amax(dim=-1))).any())
    if probs is not None and not flat:
        top, order = probs.topk(CANDIDATES, dim=-1)  # [N, C] each, descending
        # a row fits when its filters keep only candidates (a flat row's nucleus cannot)
        kept = ((batch.top_k > 0) & (batch.top_k <= CANDIDATES)) \
            | ((batch.top_p < 1) & (top.sum(dim=-1) >= batch.top_p)) \
            | ((batch.min_p > 0) & (top[:, -1] < batch.min_p * top[:, 0]))
        if bool((kept | ~sampled).all()):  # the step's one sync; else the full sort below
            return scores.gather(1, order), order, top
    if not sort:
        return None
    order = _sort_descending(scores.softmax(dim=-1) if probs is None else probs)  # [N, V]
    return scores.gather(1, order), order, None


def _sample_masked(scores: torch.Tensor, batch: SamplingBatch, greedy: torch.Tensor
                   ) -> torch.Tensor:
    """Top-p / min-p rows (no top-k) drawn over the whole vocabulary: each row's kept set
    as a mask (``nucleus``; min-p of the max; the most likely token always), then the same
    seeded Gumbel draw the sorted path makes (noise is a function of the vocab id, not of a
    position), so the same tokens without sorting the vocabulary."""
    n, vocab = scores.shape
    probs = scores.softmax(dim=-1)  # [N, V]
    top = probs.amax(dim=-1, keepdim=True)  # [N, 1]
    keep = nucleus(probs, batch.top_p) & (probs >= batch.min_p.unsqueeze(1) * top)
    keep[torch.arange(n), probs.argmax(dim=-1)] = True  # the most likely token stays
    vocab_ids = torch.arange(vocab, device=scores.device)  # [V]
    noisy = (scores + _gumbel(batch, vocab_ids)).masked_fill(~keep, float("-inf"))
    return torch.where(batch.temperature > 0, noisy.argmax(dim=-1), greedy)


def _sort_descending(probs: torch.Tensor) -> torch.Tensor:
    """``[N, V]`` each row's vocab ids by descending probability (ties: lower id first), as
    one stable sort of ``[N * V]`` int64 keys (row, then the probability's float32 bits,
    which order non-negative floats as integers do): torch sorts such keys by radix, 2.7x
    faster than a row-wise float sort of a 49k vocabulary on a CPU core."""
    n, v = probs.shape
    rows = torch.arange(n, device=probs.device).unsqueeze(1)  # [N, 1]
    key = (rows << 32) | (0x7FFFFFFF - probs.view(torch.int32)).long()  # [N, V]
    _, flat = key.view(-1).sort(stable=True)  # [N * V]
    return flat.view(n, v) - rows * v


def apply_penalties(logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
    """Repetition, presence and frequency penalties and banned ids, for the rows that have
    them (vLLM's definitions), batched and sparse: one host -> device copy of the rows'
    histories as flat ``row * V + token`` keys, then the penalties applied at the positions
    those keys name only (no ``[N, V]`` mask or count matrix).

    Args:
        logits: ``[N, V]`` float32 logits.
        specs: sampling settings per row.

    Returns:
        ``[N, V]`` logits (``logits`` itself when no row has any).
    """
    rows = [i for i, s in enumerate(specs) if s.history or s.banned]
    if not rows:
        return logits
    dev, vocab = logits.device, logits.shape[1]
    seen, done, ban = [], [], []  # flat keys row * V + token
    rep = torch.ones(len(specs))
    pres, freq = torch.zeros(len(specs)), torch.zeros(len(specs))
    for i in rows:
        s = specs[i]
        base = i * vocab
        seen += [base + t for t in s.history]
        done += [base + t for t in s.history[s.prompt_len:]]
        ban += [base + min(t, vocab - 1) for t in s.banned]
        rep[i], pres[i], freq[i] = s.repetition_penalty, s.presence_penalty, s.frequency_penalty
    keys = h2d.tensor(seen + done + ban, torch.int64, dev)  # one copy: every key
    seen_k, done_k, ban_k = keys.split([len(seen), len(done), len(ban)])
    rep, pres, freq = h2d.to_device(torch.stack([rep, pres, freq]), dev)  # [N] each
    out = logits.clone()
    flat = out.view(-1)  # [N * V]
    if seen:  # repetition: every token of the prompt and completion, once
        u = torch.unique(seen_k)
        v, r = flat[u], rep[u // vocab]
        flat[u] = torch.where(v > 0, v / r, v * r)
    if done:  # frequency per occurrence in the completion, presence once
        u, n = torch.unique(done_k, return_counts=True)
        row = u // vocab
        flat[u] = flat[u] - freq[row] * n.to(flat.dtype) - pres[row]
    if ban:
        flat[ban_k] = float("-inf")
    return out


def sample(logits: torch.Tensor, seq_ids: list[int], specs: list[SamplingSpec],
           mode: str = "raw_logprobs") -> list[SampledToken]:
    """Samples one token per row and returns them with the logprobs asked for.

    Logprobs are of the distribution ``mode`` names (``LOGPROBS_MODES``; by default the
    model's raw distribution, before penalties, temperature and filters, as in vLLM). The
    step's results reach the host in one transfer.

    Args:
        logits: ``[N, V]`` logits (any float dtype; sampled in float32).
        seq_ids: sequence id per row.
        specs: sampling settings per row.
        mode: what the returned logprobs are of.
    """
    logits = logits.float()
    batch = SamplingBatch.build(specs, logits.device)
    penalized = apply_penalties(logits, specs)
    tokens = sample_tokens(penalized, batch)  # [N]
    if batch.max_logprobs is None:
        return [SampledToken(sid, t) for sid, t in zip(seq_ids, tokens.tolist())]
    source = logprob_source(penalized if mode.startswith("processed") else logits, mode,
                            batch)  # [N, V]
    k = min(batch.max_logprobs, logits.shape[-1])
    rows = logprob_rows(source, tokens, k)  # [N, 3 + 2k]
    out = []
    for sid, spec, want, row in zip(seq_ids, specs, batch.want_logprobs, rows):
        tok = SampledToken(sid, int(row[0]))
        if want:
            tok.logprob, tok.rank = row[1], int(row[2])
            kk = min(spec.logprobs, k)
            tok.top_logprobs = dict(zip(map(int, row[3:3 + kk]), row[3 + k:3 + k + kk]))
        out.append(tok)
    return out
