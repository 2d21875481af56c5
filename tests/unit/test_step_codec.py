"""Step plans and sampled tokens survive the flat-array encoding unchanged."""

from __future__ import annotations

import numpy as np

from seesaw_mcore.contract import (
    DISK,
    HOST,
    KVMove,
    Phase,
    SampledToken,
    SamplingSpec,
    ScheduledSeq,
    SchedulerOutput,
    SlotRange,
    StepPlan,
)
from seesaw_mcore.runtime.step_codec import (
    decode_step,
    decode_tokens,
    encode_step,
    encode_tokens,
    token_width,
)


def _seq(i: int, n: int = 1, logprobs=None) -> ScheduledSeq:
    spec = SamplingSpec(0.7 + i / 3, 40, 0.95, (1 << 62) + i, i, logprobs, 0.05)
    return ScheduledSeq(i, list(range(100 + i, 100 + i + n)), 17 * i, [i, 3 * i + 1], spec)


def test_step_round_trip():
    rep = SchedulerOutput(
        Phase.DECODE, [[_seq(1), _seq(2, logprobs=3)], [_seq(3, 5)]],
        evict=[KVMove(9, SlotRange(4, 20, HOST), [5, 6])],
        swap_in=[KVMove(8, SlotRange(512, 7, DISK), [1])], swap_out=[])
    for step in (StepPlan([rep, None, rep]), StepPlan([], switch_to=Phase.PREFILL),
                 StepPlan([], stop=True, error="rank 0 failed: ünïcode ✓"), StepPlan([None])):
        arr = encode_step(step)
        assert arr.dtype == np.int64
        assert decode_step(arr) == step


def test_tokens_round_trip():
    seqs = [_seq(1), _seq(2, logprobs=2), _seq(3, logprobs=0)]
    toks = [SampledToken(1, 5), SampledToken(2, 7, -0.25, {7: -0.25, 3: -1.5}),
            SampledToken(3, 9, -2.0, {})]
    arr = encode_tokens(toks, token_width(seqs))
    assert arr.shape == (3, 6)
    assert decode_tokens(arr, seqs) == toks
