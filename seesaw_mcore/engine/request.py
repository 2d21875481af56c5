"""Sequences: one completion of one prompt, with its token accounting."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from seesaw_mcore.contract import SlotRange
from seesaw_mcore.sampling_params import SamplingParams


class SeqStatus(str, enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"  # needs (re)prefill: no KV on the device
    RUNNING = "running"  # KV on the device, decoding
    SWAPPED = "swapped"  # prefilled; KV in the host tier, waiting to be admitted to decode
    FINISHED = "finished"


@dataclass
class Sequence:
    """One completion (``sample_index`` of ``n``) of the prompt at ``request_index``."""

    seq_id: int
    request_index: int  # position of the prompt in the input (output order)
    sample_index: int  # 0 .. n-1
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # resolved sampling seed of this completion
    max_tokens: int  # resolved: never past the model context
    replica: int = 0  # DP replica that owns it
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    host_slots: SlotRange | None = None  # host-tier slots holding its KV (SWAPPED)
    finish_reason: str | None = None  # "stop" or "length" once finished
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids


@dataclass
class CompletionOutput:
    """One completion, shaped like vLLM's."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" (EOS, stop token or stop string) or "length"
    stop_reason: int | str | None = None  # the stop token id or string; None for EOS/length
    logprobs: list[dict[int, float]] | None = None  # per token: {token_id: logprob}, if asked
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """All completions of one prompt, shaped like vLLM's."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True
    latency_s: float = 0.0  # from generate() start to this request's last token
