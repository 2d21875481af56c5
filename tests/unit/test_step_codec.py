"""Step plans and sampled tokens survive the flat-array encoding unchanged."""

from __future__ import annotations

import numpy as np

from seesaw_mcore.contract import (
    DISK,
    HOST,
    Control,
    ControlKind,
    KVMove,
    MovePlan,
    Phase,
    SampledToken,
    SamplingSpec,
    ScheduledSeq,
    SchedulerOutput,
    SlotRange,
    Step,
    Stop,
    Switch,
)
from seesaw_mcore.runtime.step_codec import (
    decode_prompt_rows,
    decode_step,
    decode_tokens,
    encode_prompt_rows,
    encode_step,
    encode_tokens,
    prompt_shape,
    token_width,
)


def _seq(i: int, n: int = 1, logprobs=None, prompt_logprobs=None, tokens=None,
         penalties=False) -> ScheduledSeq:
    extra = dict(repetition_penalty=1.3, presence_penalty=-0.5, frequency_penalty=0.25,
                 history=[3, 1, 4, 1, 5], prompt_len=2, banned=[2, 7]) if penalties else {}
    spec = SamplingSpec(0.7 + i / 3, 40, 0.95, (1 << 62) + i, i, logprobs, 0.05,
                        prompt_logprobs=prompt_logprobs, **extra)
    toks = tokens if tokens is not None else list(range(100 + i, 100 + i + n))
    return ScheduledSeq(i, toks, 17 * i, [i, 3 * i + 1], spec)


def test_step_round_trip():
    rep = SchedulerOutput(
        Phase.DECODE, [[_seq(1), _seq(2, logprobs=3, penalties=True)],
                       [_seq(3, 5, prompt_logprobs=2)]],
        evict=[KVMove(9, SlotRange(4, 20, HOST), [5, 6])],
        swap_in=[KVMove(8, SlotRange(512, 7, DISK), [1])], swap_out=[])
    for step in (Step([rep, None, rep]), Switch(Phase.PREFILL),
                 Switch(Phase.DECODE, [None, rep]), Stop("rank 0 failed: ünïcode ✓"), Stop(),
                 MovePlan("P2:T2"), Step([None]), Control(ControlKind.KEEPALIVE),
                 Control(ControlKind.SLEEP, '{"level": 2, "note": "ünïcode ✓"}')):
        arr = encode_step(step)
        assert arr.dtype == np.int64
        assert decode_step(arr) == step


def test_tokens_round_trip():
    seqs = [_seq(1), _seq(2, logprobs=2), _seq(3, logprobs=0)]
    toks = [SampledToken(1, 5),
            SampledToken(2, 7, logprob=-0.25, rank=1, top_logprobs={7: -0.25, 3: -1.5}),
            SampledToken(3, 9, logprob=-2.0, rank=4, top_logprobs={})]
    arr = encode_tokens(toks, token_width(seqs))
    assert arr.shape == (3, 7)
    assert decode_tokens(arr, seqs) == toks


def test_prompt_rows_round_trip():
    seqs = [_seq(1, prompt_logprobs=1, tokens=[4, 5, 6]), _seq(2),
            _seq(3, prompt_logprobs=3, tokens=[7, 8])]
    assert prompt_shape(seqs) == (3, 9)  # 2 + 1 rows; the widest asks for 3
    toks = [SampledToken(1, 5, prompt_rows=[[5, -1.0, 2, 9, -0.5], [6, -0.1, 1, 6, -0.1]]),
            SampledToken(2, 6),
            SampledToken(3, 7, prompt_rows=[[8, -3.0, 5, 1, 2, 3, -0.1, -0.2, -0.3]])]
    arr = encode_prompt_rows(toks, seqs)
    got = [SampledToken(t.seq_id, t.token_id) for t in toks]
    decode_prompt_rows(arr, seqs, got)
    assert [t.prompt_rows for t in got] == [t.prompt_rows for t in toks]
