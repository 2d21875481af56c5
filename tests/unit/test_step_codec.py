"""Step plans and sampled tokens survive the flat-array encoding unchanged."""

from __future__ import annotations

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
    SeqMirror,
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
        preempt=[KVMove(9, SlotRange(4, 20, HOST), [5, 6])],
        swap_in=[KVMove(8, SlotRange(512, 7, DISK), [1])], swap_out=[])
    for step in (Step([rep, None, rep]), Switch(Phase.PREFILL),
                 Switch(Phase.DECODE, [None, rep]), Stop("rank 0 failed: ünïcode ✓"), Stop(),
                 MovePlan("P2:T2"), Step([None]), Control(ControlKind.KEEPALIVE),
                 Control(ControlKind.SLEEP, '{"level": 2, "note": "ünïcode ✓"}')):
        assert decode_step(encode_step(step)) == step


def _decode_seq(sid: int, history: list[int], table: list[int], step: int) -> ScheduledSeq:
    spec = SamplingSpec(0.8, 0, 0.9, 5 + sid, step, None, repetition_penalty=1.1,
                        history=list(history), prompt_len=256)
    return ScheduledSeq(sid, history[-1:], len(history) - 1, list(table), spec)


def test_steps_through_mirrors_carry_diffs_and_come_back_whole():
    """A sequence's spec, table and history reach the other rank once; later steps carry
    what changed; the other rank rebuilds the same ScheduledSeq every step; a table that
    changes other than by growing (a preemption) and a changed spec still arrive whole;
    forgotten sequences leave both mirrors."""
    enc, dec = SeqMirror(), SeqMirror()
    enc.active = True
    hist = {1: list(range(40)), 2: list(range(60, 90))}
    tables = {1: [0, 1, 2], 2: [7, 8]}
    for step in range(12):
        seqs = []
        for sid in (1, 2):
            hist[sid].append(1000 + step)
            if step % 4 == 3:
                tables[sid].append(20 * sid + step)
            seqs.append(_decode_seq(sid, hist[sid], tables[sid], step))
        if step == 6:  # preempted and recomputed into other blocks
            tables[1] = [30, 31, 32, 33]
            seqs[0] = _decode_seq(1, hist[1], tables[1], step)
        if step == 8:  # its spec changed
            seqs[1] = ScheduledSeq(2, [5], 10, tables[2], SamplingSpec(
                0.1, 3, 1.0, 7, step, 2, history=list(hist[2]), prompt_len=256))
        msg = Step([SchedulerOutput(Phase.DECODE, [seqs])])
        assert decode_step(encode_step(msg, enc), dec) == msg
    assert set(enc.known) == set(dec.known) == {1, 2}
    enc.forget(1)
    msg = Step([SchedulerOutput(Phase.DECODE, [[_decode_seq(2, hist[2], tables[2], 12)]])])
    assert decode_step(encode_step(msg, enc), dec) == msg
    assert set(enc.known) == set(dec.known) == {2}
    decode_step(encode_step(Stop(), enc), dec)
    assert enc.known == dec.known == {}


def test_step_message_bytes_do_not_grow_with_context():
    """A decode step of 64 penalized sequences (their whole history is the sampler's
    input) costs the same bytes at 100 and at 10,000 tokens of context, once every rank
    knows the sequences."""
    sizes = {}
    for ctx in (100, 10_000):
        enc, dec = SeqMirror(), SeqMirror()
        enc.active = True
        hist = {i: list(range(ctx)) for i in range(64)}
        tables = {i: list(range(i * 1000, i * 1000 + ctx // 16 + 1)) for i in range(64)}
        for step in range(3):
            seqs = []
            for i in range(64):
                hist[i].append(7)
                seqs.append(_decode_seq(i, hist[i], tables[i], step))
            data = encode_step(Step([SchedulerOutput(Phase.DECODE, [seqs])]), enc)
            decode_step(data, dec)
        sizes[ctx] = len(data)
    # a few dozen bytes a sequence; only the integers' widths grow (msgpack's)
    assert sizes[10_000] < 1.5 * sizes[100] and sizes[10_000] < 64 * 24, sizes
    first = encode_step(Step([SchedulerOutput(Phase.DECODE, [seqs])]), SeqMirror())
    assert len(first) > 64 * 10_000  # whole, without a mirror: what every step used to be


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
