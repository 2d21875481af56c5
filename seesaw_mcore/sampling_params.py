"""``SamplingParams`` with vLLM's names and meanings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from seesaw_mcore.errors import SeesawError


class RequestOutputKind(enum.IntEnum):
    """What a streamed request's outputs hold (vLLM's ``RequestOutputKind``)."""

    CUMULATIVE = 0  # everything so far, each time
    DELTA = 1  # only what is new since the last output
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    """How to sample one request's completions.

    Attributes:
        n: completions per prompt.
        temperature: 0 means greedy; otherwise logits are divided by it.
        top_k: keep the k most likely tokens (-1 or 0: all).
        top_p: keep the smallest set with cumulative probability >= top_p (1.0: all).
        min_p: drop tokens whose probability is below ``min_p`` times the most likely
            token's (0.0: off).
        seed: per-request seed; the same seed gives the same tokens across runs and across
            parallel layouts. ``None``: derived from the engine seed and the request index.
        max_tokens: most tokens to generate per completion.
        stop: strings that end a completion (not included in the text).
        stop_token_ids: token ids that end a completion (kept in ``token_ids``).
        ignore_eos: keep generating past EOS.
        logprobs: if set, return the logprob of each sampled token and the top ``logprobs``
            alternatives (``dict[token_id, Logprob]`` per token, the sampled one always in).
        prompt_logprobs: if set, return for every prompt position but the first the
            logprob of the actual token and the top ``prompt_logprobs`` alternatives.
            Positions that would come from the prefix cache are computed (vLLM's rule).
        prompt_logprobs_from: this engine's extension: prompt logprobs only from this
            position on (earlier entries are ``None``), so the prefix before it may come
            from the prefix cache (the lm-eval backend scores a continuation so).
        min_tokens: EOS and ``stop_token_ids`` cannot end a completion before this many
            tokens (stop strings still can, as in vLLM).
        repetition_penalty: > 1 discourages tokens already in the prompt or the completion
            (a positive logit is divided by it, a negative one multiplied; 1.0: off).
        presence_penalty: subtracted from the logit of every token already generated
            (-2 to 2; 0: off).
        frequency_penalty: subtracted once per earlier occurrence in the completion
            (-2 to 2; 0: off).
        skip_special_tokens: leave special tokens out of the text.
        spaces_between_special_tokens: put spaces between special tokens in the text
            (with ``skip_special_tokens=False``).
        include_stop_str_in_output: keep the stop string that ended a completion in its
            text.
        output_kind: what ``AsyncLLM.generate``'s outputs hold (``RequestOutputKind``;
            ``LLM.generate`` returns final outputs whatever it says).
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    prompt_logprobs_from: int = 0
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    _checked: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _require(self.stop is None or isinstance(self.stop, (list, tuple)), "stop", self.stop,
                 "a string or a list of non-empty strings")
        _require(self.stop_token_ids is None or isinstance(self.stop_token_ids, (list, tuple)),
                 "stop_token_ids", self.stop_token_ids, "a list of token ids >= 0")
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _require(_is_int(self.n) and self.n >= 1, "n", self.n, "an integer >= 1")
        _require(_is_num(self.temperature) and 0 <= self.temperature < float("inf"),
                 "temperature", self.temperature, "a finite number >= 0")
        _require(_is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 0), "top_k",
                 self.top_k, "-1, 0 or a positive integer")
        _require(_is_num(self.top_p) and 0 < self.top_p <= 1, "top_p", self.top_p,
                 "a number in (0, 1]")
        _require(_is_num(self.min_p) and 0 <= self.min_p <= 1, "min_p", self.min_p,
                 "a number in [0, 1]")
        _require(self.seed is None or _is_int(self.seed), "seed", self.seed, "an integer or None")
        _require(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
                 "max_tokens", self.max_tokens, "an integer >= 1")
        _require(all(isinstance(s, str) and s for s in self.stop), "stop", self.stop,
                 "a list of non-empty strings")
        _require(all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
                 self.stop_token_ids, "a list of token ids >= 0")
        _require(isinstance(self.ignore_eos, bool), "ignore_eos", self.ignore_eos, "a bool")
        _require(self.logprobs is None or (_is_int(self.logprobs) and self.logprobs >= 0),
                 "logprobs", self.logprobs, "an integer >= 0 or None")
        _require(self.prompt_logprobs is None
                 or (_is_int(self.prompt_logprobs) and self.prompt_logprobs >= 0),
                 "prompt_logprobs", self.prompt_logprobs, "an integer >= 0 or None")
        _require(_is_int(self.prompt_logprobs_from) and self.prompt_logprobs_from >= 0,
                 "prompt_logprobs_from", self.prompt_logprobs_from, "an integer >= 0")
        _require(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
                 self.min_tokens, "an integer >= 0")
        _require(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
                 self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        _require(_is_num(self.repetition_penalty) and 0 < self.repetition_penalty < float("inf"),
                 "repetition_penalty", self.repetition_penalty, "a finite number > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _require(_is_num(value) and -2 <= value <= 2, name, value, "a number in [-2, 2]")
        for name in ("skip_special_tokens", "spaces_between_special_tokens",
                     "include_stop_str_in_output"):
            _require(isinstance(getattr(self, name), bool), name, getattr(self, name), "a bool")
        _require(self.output_kind in tuple(RequestOutputKind), "output_kind", self.output_kind,
                 "a RequestOutputKind (0 cumulative, 1 delta, 2 final only)")
        self.output_kind = RequestOutputKind(self.output_kind)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        """Whether the sampler needs the sequence's token history."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _require(ok: bool, name: str, value, what: str) -> None:
    if not ok:
        raise SeesawError(f"SamplingParams.{name} must be {what}, got {value!r}")
