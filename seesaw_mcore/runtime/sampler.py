"""Token sampling on the last pipeline stage, batched on the device.

One pass over the step's ``[N, V]`` logits: rows with penalties or banned ids (``min_tokens``)
first get them applied (one scatter over the step's token histories); greedy rows by argmax;
sampled rows by temperature, then top-k, top-p and min-p (per-row tensors, at most one sort
per step, over the top ``CANDIDATES`` tokens when they hold every row's nucleus), then a
Gumbel-max draw; logprobs of every row in one ``log_softmax``; one device -> host transfer
of the step's tokens (and logprobs). The O(steps) work does not grow with the batch.

Randomness is counter-based: the Gumbel noise of row ``r`` at vocab index ``v`` is a hash of
``(seed_r, step_r, v)`` computed on the device (splitmix64), so a completion's tokens do not
depend on the batch it runs in, the parallel layout, or preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seesaw_mcore import h2d
from seesaw_mcore.contract import SampledToken, SamplingSpec

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
    return -torch.log(-torch.log(uniform_noise(batch.seed, batch.step, vocab_ids)))


@dataclass
class SamplingBatch:
    """One step's sampling settings as per-row tensors on the device.

    Built from the rows' ``SamplingSpec`` in two host -> device copies.
    """

    temperature: torch.Tensor  # [N] float32, 0 = greedy
    top_p: torch.Tensor  # [N] float32, 1 = off
    min_p: torch.Tensor  # [N] float32, 0 = off
    top_k: torch.Tensor  # [N] int64, <= 0 = off
    seed: torch.Tensor  # [N] int64
    step: torch.Tensor  # [N] int64
    any_random: bool  # some row samples (else argmax only)
    any_filter: bool  # some sampled row uses top-k / top-p / min-p (else no sort)
    all_top_k: int  # every sampled row has top-k on: the largest k (0: some row has not)
    max_logprobs: int | None  # most top-k logprobs any row asks for; None: no row asks
    want_logprobs: list[bool]  # per row

    @classmethod
    def build(cls, specs: list[SamplingSpec], device: torch.device) -> "SamplingBatch":
        """Packs per-row settings (host Python over the rows, two tensor copies)."""
        floats = h2d.tensor([(s.temperature, s.top_p, s.min_p) for s in specs],
                            torch.float32, device)  # [N, 3]
        ints = h2d.tensor([(s.top_k, s.seed & ((1 << 63) - 1), s.step) for s in specs],
                          torch.int64, device)  # [N, 3]
        rand = [s.temperature > 0 for s in specs]
        filt = any(r and (s.top_k > 0 or s.top_p < 1 or s.min_p > 0)
                   for r, s in zip(rand, specs))
        asks = [s.logprobs for s in specs if s.logprobs is not None]
        ks = [s.top_k if s.top_k > 0 else 0 for r, s in zip(rand, specs) if r]
        return cls(floats[:, 0], floats[:, 1], floats[:, 2], ints[:, 0], ints[:, 1],
                   ints[:, 2], any(rand), filt, max(ks) if ks and min(ks) > 0 else 0,
                   max(asks) if asks else None,
                   [s.logprobs is not None for s in specs])


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
        scores, order, full = _candidates(scores, batch)
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


def _candidates(scores: torch.Tensor, batch: SamplingBatch
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rows' tokens in descending order, as far as the filters can keep any: the top
    ``CANDIDATES`` when, for every sampled row, they hold all a filter can keep (top-k with
    k <= CANDIDATES, the top-p nucleus, or every token above min-p), else the full sort.

    Returns:
        ``(scores, order, full)``: ``[N, K]`` sorted scores and their vocab ids, and the
        full-vocabulary probabilities of those columns (``None`` after a full sort).
    """
    vocab = scores.shape[1]
    sampled = batch.temperature > 0
    probs = scores.softmax(dim=-1) if CANDIDATES < vocab else None  # [N, V]
    if probs is not None:
        top, order = probs.topk(CANDIDATES, dim=-1)  # [N, C] each, descending
        # a row fits when its filters keep only candidates (a flat row's nucleus cannot)
        kept = ((batch.top_k > 0) & (batch.top_k <= CANDIDATES)) \
            | ((batch.top_p < 1) & (top.sum(dim=-1) >= batch.top_p)) \
            | ((batch.min_p > 0) & (top[:, -1] < batch.min_p * top[:, 0]))
        if bool((kept | ~sampled).all()):  # the step's one sync; else the full sort below
            return scores.gather(1, order), order, top
    order = _sort_descending(scores.softmax(dim=-1) if probs is None else probs)  # [N, V]
    return scores.gather(1, order), order, None


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
    them (vLLM's definitions), batched: one host -> device copy of the rows' histories and
    one scatter each for the "seen" mask and the completion counts.

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
    seen_r, seen_t, out_r, out_t, ban_r, ban_t, params = [], [], [], [], [], [], []
    for j, i in enumerate(rows):
        s = specs[i]
        seen_r += [j] * len(s.history)
        seen_t += s.history
        done = s.history[s.prompt_len:]
        out_r += [j] * len(done)
        out_t += done
        ban_r += [j] * len(s.banned)
        ban_t += s.banned
        params.append((s.repetition_penalty, s.presence_penalty, s.frequency_penalty))
    flat = seen_r + seen_t + out_r + out_t + ban_r + ban_t
    idx = h2d.tensor(flat, torch.int64, dev)  # one copy: every index list
    cuts = [len(seen_r)] * 2 + [len(out_r)] * 2 + [len(ban_r)] * 2
    seen_r_t, seen_t_t, out_r_t, out_t_t, ban_r_t, ban_t_t = idx.split(cuts)
    rep, pres, freq = h2d.tensor(params, torch.float32, dev).unbind(1)  # [R] each
    sub = logits[rows]  # [R, V]
    seen = torch.zeros_like(sub, dtype=torch.bool)
    seen[seen_r_t, seen_t_t] = True
    counts = torch.zeros_like(sub)
    counts.index_put_((out_r_t, out_t_t), torch.ones_like(out_t_t, dtype=sub.dtype),
                      accumulate=True)  # [R, V]
    rep = rep.unsqueeze(1)  # [R, 1]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq.unsqueeze(1) * counts - pres.unsqueeze(1) * (counts > 0)
    sub[ban_r_t, ban_t_t.clamp(max=vocab - 1)] = float("-inf")
    logits = logits.clone()
    logits[rows] = sub
    return logits


def sample(
    logits: torch.Tensor, seq_ids: list[int], specs: list[SamplingSpec]
) -> list[SampledToken]:
    """Samples one token per row and returns them with the logprobs asked for.

    Logprobs are of the model's raw distribution (before temperature and filters), as in
    vLLM. The step's results reach the host in one transfer.

    Args:
        logits: ``[N, V]`` logits (any float dtype; sampled in float32).
        seq_ids: sequence id per row.
        specs: sampling settings per row.
    """
    logits = logits.float()
    batch = SamplingBatch.build(specs, logits.device)
    tokens = sample_tokens(apply_penalties(logits, specs), batch)  # [N]
    if batch.max_logprobs is None:
        return [SampledToken(sid, t) for sid, t in zip(seq_ids, tokens.tolist())]
    logp = torch.log_softmax(logits, dim=-1)  # [N, V] of the raw logits, as vLLM
    chosen = logp.gather(1, tokens.unsqueeze(1))  # [N, 1]
    rank = (logp > chosen).sum(dim=1, keepdim=True) + 1  # [N, 1]
    cols = [tokens.double().unsqueeze(1), chosen.double(), rank.double()]
    k = min(batch.max_logprobs, logp.shape[-1])
    if k:
        top = logp.topk(k, dim=-1)  # [N, k]
        cols += [top.indices.double(), top.values.double()]
    rows = torch.cat(cols, dim=1).tolist()  # one device -> host transfer: [N, 3 + 2k]
    out = []
    for sid, spec, want, row in zip(seq_ids, specs, batch.want_logprobs, rows):
        tok = SampledToken(sid, int(row[0]))
        if want:
            tok.logprob, tok.rank = row[1], int(row[2])
            kk = min(spec.logprobs, k)
            tok.top_logprobs = dict(zip(map(int, row[3:3 + kk]), row[3 + k:3 + k + kk]))
        out.append(tok)
    return out
