"""The batched sampler: batch invariance of seeded rows, filters (top-k, top-p, min-p) against
a per-row reference, greedy rows, logprobs, and the counter-based noise."""

from __future__ import annotations

import math

import pytest
import torch

from seesaw_mcore.contract import SamplingSpec
from seesaw_mcore.runtime.prompt_logprobs import prompt_logprob_rows
from seesaw_mcore.runtime.sampler import apply_penalties, sample, uniform_noise

V = 50


def spec(temperature=0.8, top_k=-1, top_p=1.0, seed=7, step=0, logprobs=None, min_p=0.0):
    return SamplingSpec(temperature, top_k, top_p, seed, step, logprobs, min_p)


def _logits(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_seeded_row_is_batch_invariant():
    logits = _logits(6)
    row = spec(top_k=10, top_p=0.9, seed=123, step=4)
    alone = sample(logits[2:3], [0], [row])[0].token_id
    others = [spec(seed=s, step=s, top_p=0.5) for s in range(6)]
    for pos in range(6):  # the same row anywhere in a batch of mixed settings
        specs = others[:pos] + [row] + others[pos + 1:]
        batch = torch.cat([logits[:pos], logits[2:3], logits[pos + 1:]])
        got = sample(batch, list(range(6)), specs)[pos].token_id
        assert got == alone


def test_draws_follow_the_distribution():
    """Over many (seed, step) pairs a row's draws match softmax(logits / T)."""
    logits = _logits(1, seed=3)[0, :8].unsqueeze(0) / 3
    n = 4000
    specs = [spec(temperature=0.7, seed=s % 40, step=s // 40) for s in range(n)]
    toks = [t.token_id for t in sample(logits.expand(n, 8), list(range(n)), specs)]
    freq = torch.bincount(torch.tensor(toks), minlength=8).float() / n
    want = (logits[0] / 0.7).softmax(-1)
    assert (freq - want).abs().max() < 0.03, (freq, want)


@pytest.mark.parametrize("kind", ["top_k", "top_p", "min_p"])
def test_filters_keep_only_allowed_tokens(kind):
    logits = _logits(64, seed=5)
    kw = {"top_k": dict(top_k=3), "top_p": dict(top_p=0.6), "min_p": dict(min_p=0.2)}[kind]
    specs = [spec(temperature=1.5, seed=i, step=i, **kw) for i in range(64)]
    toks = sample(logits, list(range(64)), specs)
    for i, t in enumerate(toks):
        probs = (logits[i] / 1.5).softmax(-1)
        order = probs.argsort(descending=True)
        if kind == "top_k":
            allowed = set(order[:3].tolist())
        elif kind == "top_p":
            cum = probs[order].cumsum(0) - probs[order]
            allowed = set(order[cum < 0.6].tolist())
        else:
            allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
        assert t.token_id in allowed, (kind, i, t.token_id, allowed)


def test_greedy_rows_are_argmax_and_logprobs_are_raw():
    logits = _logits(4)
    specs = [spec(temperature=0, logprobs=3), spec(temperature=1.0, logprobs=0),
             spec(temperature=0), spec(temperature=0.5, logprobs=5)]
    toks = sample(logits, [10, 11, 12, 13], specs)
    assert [t.seq_id for t in toks] == [10, 11, 12, 13]
    assert toks[0].token_id == int(logits[0].argmax()) == toks[0].token_id
    assert toks[2].token_id == int(logits[2].argmax()) and toks[2].logprob is None
    logp = torch.log_softmax(logits, -1)
    for i, k in ((0, 3), (1, 0), (3, 5)):
        t = toks[i]
        assert math.isclose(t.logprob, float(logp[i, t.token_id]), abs_tol=1e-5)
        assert list(t.top_logprobs) == logp[i].topk(k).indices.tolist() if k else not t.top_logprobs


def test_noise_is_counter_based():
    seed = torch.tensor([1, 1, 2], dtype=torch.int64)
    step = torch.tensor([0, 1, 0], dtype=torch.int64)
    ids = torch.arange(1000)
    u = uniform_noise(seed, step, ids)
    assert u.shape == (3, 1000) and u.dtype == torch.float32
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.03
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    again = uniform_noise(seed[[2, 0]], step[[2, 0]], ids)  # other rows, other order
    assert torch.equal(again, u[[2, 0]])
    assert torch.equal(uniform_noise(seed[:1], step[:1], ids), u[:1])
    # per-row vocab ids (a top-k candidate list) draw the same values as the full row
    cand = torch.tensor([[5, 900, 3], [7, 7, 0], [999, 1, 2]])
    assert torch.equal(uniform_noise(seed, step, cand), u.gather(1, cand))


def test_penalties_match_a_direct_computation():
    """vLLM's definitions, row by row: repetition over prompt + completion, presence and
    frequency over the completion only; rows without them untouched."""
    logits = _logits(3)
    prompt, done = [3, 5, 5], [5, 7, 7, 9]
    s = SamplingSpec(0.0, -1, 1.0, 1, 0, None, repetition_penalty=1.5, presence_penalty=0.4,
                     frequency_penalty=0.3, history=prompt + done, prompt_len=len(prompt))
    plain = spec(temperature=0)
    out = apply_penalties(logits, [plain, s, plain])
    want = logits[1].clone()
    for t in set(prompt + done):
        want[t] = want[t] / 1.5 if want[t] > 0 else want[t] * 1.5
    for t in set(done):
        want[t] -= 0.3 * done.count(t) + 0.4
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert torch.allclose(out[1], want, atol=1e-6)
    # the penalized argmax is what sample() returns for a greedy row
    [tok] = sample(logits[1:2], [0], [s])
    assert tok.token_id == int(want.argmax())


def test_banned_ids_are_never_drawn():
    logits = _logits(2)
    top = [int(logits[i].argmax()) for i in range(2)]
    specs = [SamplingSpec(0.0, -1, 1.0, 1, 0, None, banned=[top[0]]),
             SamplingSpec(1.0, -1, 1.0, 2, 0, None, banned=[top[1]])]
    for step in range(20):
        specs = [SamplingSpec(s.temperature, -1, 1.0, s.seed, step, 3, banned=s.banned)
                 for s in specs]
        toks = sample(logits, [0, 1], specs)
        assert [t.token_id for t in toks] != top and all(
            t.token_id != b for t, b in zip(toks, top))
        # logprobs stay those of the raw distribution: the banned top token is rank 1
        assert all(next(iter(t.top_logprobs)) == b for t, b in zip(toks, top))


def test_sampled_token_rank():
    logits = _logits(2)
    toks = sample(logits, [0, 1], [spec(temperature=2.0, seed=s, logprobs=1) for s in (1, 2)])
    logp = torch.log_softmax(logits, -1)
    for i, t in enumerate(toks):
        assert t.rank == int((logp[i] > logp[i, t.token_id]).sum()) + 1


def test_prompt_logprob_rows():
    logits = _logits(4)
    actual = torch.tensor([3, 1, 4, 1])
    rows = prompt_logprob_rows(logits, actual, 2)
    logp = torch.log_softmax(logits, -1)
    for i, row in enumerate(rows):
        assert row[0] == actual[i] and math.isclose(row[1], float(logp[i, actual[i]]),
                                                    abs_tol=1e-6)
        assert row[2] == int((logp[i] > logp[i, actual[i]]).sum()) + 1
        assert row[3:5] == logp[i].topk(2).indices.tolist()


@pytest.mark.parametrize("peaked", [True, False])
def test_nucleus_from_candidates_equals_full_sort(monkeypatch, peaked):
    """Top-p / min-p rows (no top-k) on a 5000-token vocabulary: drawn from the top
    ``CANDIDATES`` when they hold every nucleus (peaked logits), else from the full sort
    (flat logits); either way the same tokens as the full sort."""
    from seesaw_mcore.runtime import sampler as sampler_mod

    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(24, 5000, generator=gen) * (6.0 if peaked else 0.05)
    specs = [spec(temperature=0.8, seed=i, step=3, top_p=0.9 if i % 3 else 1.0,
                  min_p=0.05 if i % 3 == 0 else 0.0, top_k=40 if i == 5 else -1)
             for i in range(24)] + [spec(temperature=0)]
    logits = torch.cat([logits, logits[:1]])
    calls = []
    real_sort = torch.Tensor.sort
    monkeypatch.setattr(torch.Tensor, "sort", lambda *a, **k: calls.append(1) or real_sort(
        *a, **k))
    got = [t.token_id for t in sample(logits, list(range(25)), specs)]
    assert bool(calls) == (not peaked)  # peaked: no sort of the vocabulary
    monkeypatch.setattr(sampler_mod, "CANDIDATES", 5000)  # always the full sort
    want = [t.token_id for t in sample(logits, list(range(25)), specs)]
    assert got == want


def test_nucleus_mask_equals_the_sorted_rule():
    """The histogram nucleus keeps exactly the tokens the sorted rule keeps (descending
    probability, lower id first among ties, while the mass before is below top_p), on flat,
    peaked and tied rows and every top_p from tiny to 1."""
    from seesaw_mcore.runtime.logprobs import nucleus

    gen = torch.Generator().manual_seed(4)
    rows = [torch.randn(3001, generator=gen) * s for s in (0.05, 1.0, 8.0)]
    tied = torch.randn(3001, generator=gen).round()  # many exactly equal logits
    rows += [tied, torch.zeros(3001)]  # (3001: no top_p lands on a boundary exactly)
    for top_p in (1e-4, 0.3, 0.9, 0.999, 1.0):
        probs = torch.stack(rows).softmax(-1)  # [5, 3001]
        got = nucleus(probs, torch.full((5,), top_p))
        for i, row in enumerate(probs):
            order = sorted(range(3001), key=lambda t: (-row[t].item(), t))
            want, before = set(), 0.0
            for t in order:
                if before >= top_p and top_p < 1:  # (1: off, every token)
                    break
                want.add(t)
                before += row[t].item()
            assert set(got[i].nonzero().flatten().tolist()) == want, (i, top_p)


@pytest.mark.parametrize("settings", [dict(top_k=5), dict(top_p=0.6), dict(min_p=0.2),
                                      dict(top_k=12, top_p=0.8, min_p=0.05), dict()])
def test_processed_logprobs_hold_every_drawn_token(settings):
    """``processed_logprobs`` describe the distribution the draw uses: over many seeds, each
    drawn token has a finite processed logprob, the kept set is what the filters keep, and the
    values are a log-softmax of the tempered, filtered logits."""
    from seesaw_mcore.runtime.logprobs import process_logits
    from seesaw_mcore.runtime.sampling_batch import SamplingBatch

    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(4)) * 3
    specs = [spec(temperature=0.7, seed=s, logprobs=300, **settings) for s in range(64)]
    toks = sample(logits.expand(64, -1), list(range(64)), specs, mode="processed_logprobs")
    proc = process_logits(logits.expand(64, -1), SamplingBatch.build(specs, logits.device))[0]
    kept = torch.isfinite(proc)
    for t in toks:
        assert kept[t.token_id] and math.isfinite(t.logprob)
        assert sum(math.isfinite(v) for v in t.top_logprobs.values()) == int(kept.sum())
    want = torch.log_softmax(proc, -1)
    got = torch.tensor([toks[0].top_logprobs.get(i, -math.inf) for i in range(300)])
    assert torch.allclose(got[kept], want[kept], atol=1e-6)
    raw = sample(logits, [0], [specs[0]], mode="raw_logits")[0]
    assert raw.logprob == pytest.approx(float(logits[0, raw.token_id]))
    assert not kept.all() or not settings  # a filter drops something
