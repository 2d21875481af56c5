"""SamplingParams validation: each bad value names its field."""

from __future__ import annotations

import pytest

from seesaw_mcore.errors import SeesawError
from seesaw_mcore.sampling_params import SamplingParams


@pytest.mark.parametrize("kwargs,field", [
    ({"n": 0}, "n"), ({"temperature": -0.1}, "temperature"), ({"top_k": -2}, "top_k"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"seed": 1.5}, "seed"),
    ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"ignore_eos": 1}, "ignore_eos"),
    ({"logprobs": -1}, "logprobs"), ({"n": True}, "n"), ({"temperature": float("nan")},
                                                         "temperature"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"skip_special_tokens": "no"}, "skip_special_tokens"),
    ({"spaces_between_special_tokens": None}, "spaces_between_special_tokens"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(SeesawError, match=rf"^SamplingParams\.{field} must be "):
        SamplingParams(**kwargs)


def test_exact_messages_for_new_fields():
    with pytest.raises(SeesawError) as e:
        SamplingParams(min_tokens=5, max_tokens=4)
    assert str(e.value) == "SamplingParams.min_tokens must be <= max_tokens (4), got 5"
    with pytest.raises(SeesawError) as e:
        SamplingParams(presence_penalty=2.5)
    assert str(e.value) == "SamplingParams.presence_penalty must be a number in [-2, 2], got 2.5"


def test_defaults_and_normalization():
    p = SamplingParams(stop="###", temperature=0)
    assert p.stop == ["###"] and p.stop_token_ids == [] and p.greedy
    assert SamplingParams().max_tokens == 16 and not SamplingParams().greedy


def test_sample_seeds_depend_on_id_and_sample_not_position():
    from seesaw_mcore.engine.request import sample_seed

    seeds = {sample_seed(0, rid, k) for rid in ("a", "b", "c") for k in range(3)}
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds)
    assert sample_seed(0, "a", 1) == sample_seed(0, "a", 1) != sample_seed(1, "a", 1)
    assert sample_seed(0, "a", 1) == 0x8D4F9FA94CFE4DE  # pinned: old outputs stay reproducible
