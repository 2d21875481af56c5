"""Output processing: the incremental detokenizer matches a whole decode, stop strings cut
the text where they start (vLLM: not included) and set ``stop_reason``, requests complete
once every sample is done."""

from __future__ import annotations

import os
import random

import pytest

from seesaw_mcore.engine.output import IncrementalDetokenizer, OutputProcessor
from seesaw_mcore.engine.request import Sequence
from seesaw_mcore.sampling_params import SamplingParams

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "models", "tiny-llama")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY)


def test_incremental_matches_whole_decode(tok):
    rng = random.Random(0)
    text = "Return the naïve café's size: 42 € — ok?\n  def f(x):\n\treturn x ** 2  # 🙂"
    cases = [tok(text, add_special_tokens=False)["input_ids"],
             [rng.randrange(tok.vocab_size) for _ in range(200)]]
    for ids in cases:
        d = IncrementalDetokenizer(tok)
        pieces = [d.add(t) for t in ids]
        assert d.flush() == tok.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == d.text[:len("".join(pieces))]


def _run(tok, text: str, params: SamplingParams):
    """Feeds ``text``'s tokens one by one; returns (stopped after k tokens, output)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    seq = Sequence(seq_id=0, request_index=0, sample_index=0, prompt_token_ids=[1],
                   params=params, seed=0, max_tokens=len(ids))
    proc = OutputProcessor(tok)
    proc.add_request(0, "r", "p", [1], [seq])
    for k, t in enumerate(ids, 1):
        seq.output_token_ids.append(t)
        if k == len(ids) and seq.finish_reason is None:
            seq.finish_reason = "length"  # what the engine sets at max_tokens
        stopped, finished = proc.process([seq])
        if finished:
            return k, stopped, finished[0][1].outputs[0]
    raise AssertionError("never finished")


def test_stop_string_cut_and_reason(tok):
    text = "The answer is 42. Next question: why?"
    k, stopped, out = _run(tok, text, SamplingParams(stop=["question", "zzz"]))
    assert out.text == "The answer is 42. Next " and out.finish_reason == "stop"
    assert out.stop_reason == "question" and stopped and len(out.token_ids) == k
    # ended early: the engine frees it
    assert k < len(tok(text, add_special_tokens=False)["input_ids"])


def test_earliest_stop_string_wins(tok):
    _, _, out = _run(tok, "alpha beta gamma delta", SamplingParams(stop=["delta", "beta"]))
    assert out.text == "alpha " and out.stop_reason == "beta"


def test_stop_string_on_the_last_allowed_token(tok):
    text = "one two three"
    _, stopped, out = _run(tok, text, SamplingParams(stop=["three"]))
    assert out.text == "one two " and out.stop_reason == "three"
    assert stopped == []  # already finished by length: nothing for the engine to free


def test_no_stop_string_gives_whole_text(tok):
    _, stopped, out = _run(tok, "plain text here", SamplingParams(stop=["zzz"]))
    assert out.text == "plain text here" and out.finish_reason == "length"
    assert out.stop_reason is None and stopped == []


def test_request_done_after_all_samples():
    p = SamplingParams(n=2)
    seqs = [Sequence(seq_id=i, request_index=7, sample_index=i, prompt_token_ids=[1],
                     params=p, seed=0, max_tokens=1, output_token_ids=[5]) for i in range(2)]
    proc = OutputProcessor(None)
    proc.add_request(7, "id-7", None, [1], seqs)
    seqs[1].finish_reason = "length"
    assert proc.process([seqs[1]]) == ([], [])
    seqs[0].finish_reason = "stop"
    _, [(index, out)] = proc.process([seqs[0]])
    assert index == 7 and out.request_id == "id-7" and [o.index for o in out.outputs] == [0, 1]
    assert [o.finish_reason for o in out.outputs] == ["stop", "length"]


def test_include_stop_str_in_output(tok):
    _, _, out = _run(tok, "The answer is 42. Next question: why?",
                     SamplingParams(stop=["question"], include_stop_str_in_output=True))
    assert out.text == "The answer is 42. Next question" and out.stop_reason == "question"


def test_min_tokens_holds_back_stop_strings(tok):
    text = "one two three four five six"
    n_before = len(tok("one two", add_special_tokens=False)["input_ids"])
    _, _, out = _run(tok, text, SamplingParams(stop=["two"], min_tokens=n_before + 1))
    assert out.finish_reason == "length" and out.text == text  # "two" came too early


def test_skip_special_tokens_false_keeps_them(tok):
    ids = tok("hello", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    for skip, want in ((True, "hello"), (False, "hello" + tok.eos_token)):
        seq = Sequence(seq_id=0, request_index=0, sample_index=0, prompt_token_ids=[1],
                       params=SamplingParams(skip_special_tokens=skip), seed=0,
                       max_tokens=len(ids), output_token_ids=ids, finish_reason="stop")
        proc = OutputProcessor(tok)
        proc.add_request(0, "r", None, [1], [seq])
        _, [(_, out)] = proc.process([seq])
        assert out.outputs[0].text == want


def test_spaces_between_special_tokens_reaches_decode():
    """Passed to the tokenizer's ``decode`` only when turned off (slow tokenizers honour it;
    fast ones join special tokens their own way)."""
    calls = []

    class Tok:
        def decode(self, ids, skip_special_tokens=True, **kw):
            calls.append(kw)
            return " ".join(map(str, ids))

    for spaces, want in ((True, {}), (False, {"spaces_between_special_tokens": False})):
        calls.clear()
        IncrementalDetokenizer(Tok(), False, spaces).decode([1, 2])
        assert calls == [want]
