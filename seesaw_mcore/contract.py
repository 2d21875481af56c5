"""The contract between scheduler, runtime and engine: plain dataclasses, no tensors.

This module is the bottom of the package: it imports nothing from it and not torch, so
every layer (model, kv, runtime, engine, llm) can use these types.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

HOST, DISK = "host", "disk"  # the KV tiers below the device cache

# What returned logprobs are of (vLLM's ``logprobs_mode``): the model's distribution, or the
# one sampled from (after penalties, temperature, top-k / top-p / min-p); as logprobs or as
# the logits themselves.
LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")


@dataclass(frozen=True)
class RunOptions:
    """Engine-wide choices every rank's model runner applies to every step.

    Attributes:
        logprobs_mode: one of ``LOGPROBS_MODES``.
        routed_experts: the last stage returns each token's routed experts per MoE layer.
        batch_invariant: fixed reduction orders (``model/invariant.py``).
        max_loras: LoRA adapters held at once (0: no adapters).
        max_lora_rank: the largest adapter rank.
    """

    logprobs_mode: str = "raw_logprobs"
    routed_experts: bool = False
    batch_invariant: bool = False
    max_loras: int = 0
    max_lora_rank: int = 0


@dataclass(frozen=True)
class SlotRange:
    """``[start, start + length)`` token slots of one sequence in a KV tier."""

    start: int
    length: int
    tier: str = HOST

    @property
    def end(self) -> int:
        return self.start + self.length


class Phase(str, enum.Enum):
    PREFILL = "prefill"
    DECODE = "decode"


# Not frozen: made for every sequence at every step (a frozen dataclass's __init__ costs
# ~6x a plain one's, ~1 us a record); nothing changes one after it is made.
@dataclass(slots=True)
class SamplingSpec:
    """What the last stage needs to sample one sequence's next token."""

    temperature: float  # 0 = greedy
    top_k: int  # <= 0: off
    top_p: float  # 1.0: off
    seed: int  # with ``token_index``, fixes the random draw
    token_index: int  # index of the token being sampled in the completion
    logprobs: int | None  # top-k alternatives to return, None: no logprobs
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0: off
    repetition_penalty: float = 1.0  # on tokens in ``history``; 1: off
    presence_penalty: float = 0.0  # on tokens in the completion part of ``history``
    frequency_penalty: float = 0.0  # per occurrence in the completion part of ``history``
    history: list[int] = field(default_factory=list)  # prompt + completion ids (penalties on)
    prompt_len: int = 0  # the first ``prompt_len`` ids of ``history`` are the prompt
    banned: list[int] = field(default_factory=list)  # ids that may not be drawn (min_tokens)
    prompt_logprobs: int | None = None  # top-k of every prompt position (first prefill only)


@dataclass(slots=True)  # (per sequence per step: see SamplingSpec)
class ScheduledSeq:
    """One sequence's share of a step."""

    seq_id: int
    token_ids: list[int]  # tokens fed this step (whole prompt in prefill, last token in decode)
    start_pos: int  # position of token_ids[0]; KV of positions < start_pos is cached
    block_table: list[int]  # device blocks, enough for start_pos + len(token_ids)
    sampling: SamplingSpec
    lora: int = 0  # the LoRA adapter's index (``RankAdapters``); 0: the base model


@dataclass(frozen=True)
class KVMove:
    """One sequence's KV between its slots in a KV tier (host or disk) and its device
    blocks.

    Every rank of the replica moves its own ``[layers, heads]`` part (``KVShardLayout``).
    """

    seq_id: int
    tier_slots: SlotRange  # token slots in a tier (``tier_slots.tier``); its length moves
    block_table: list[int]  # device blocks holding (or receiving) those tokens, in order


@dataclass(frozen=True)
class SchedulerOutput:
    """One replica's step: all-prefill or all-decode, split into PP micro-batches."""

    phase: Phase
    # each runs through every stage: decode <= PP of them, prefill <= PP x
    # ``scheduler.prefill_micro_batches`` (under PP > 1)
    micro_batches: list[list[ScheduledSeq]]
    preempt: list[KVMove] = field(default_factory=list)  # preempted: device -> tier, first
    # host -> device behind the forward, for sequences that join the next step
    swap_in: list[KVMove] = field(default_factory=list)
    swap_out: list[KVMove] = field(default_factory=list)  # device -> host, after the forward

    @property
    def seqs(self) -> list[ScheduledSeq]:
        return [s for mb in self.micro_batches for s in mb]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(frozen=True)
class Step:
    """A forward step: one ``SchedulerOutput`` (or ``None``: idle) per DP replica."""

    replicas: list[SchedulerOutput | None]

    @property
    def phase(self) -> Phase:
        """The phase the step counts as (stats, the trial, the watchdog): prefill when any
        replica prefills (a static DP plan's replicas may be in different phases)."""
        return Phase.PREFILL if any(r is not None and r.phase == Phase.PREFILL
                                    for r in self.replicas) else Phase.DECODE


@dataclass(frozen=True)
class Switch:
    """Every rank re-shards to ``phase``'s layout of the live plan. ``hand_back``: per
    replica, swap-outs of sequences still on the device (decode handing back to prefill),
    run after the switch's barrier under the old layout."""

    phase: Phase
    hand_back: list[SchedulerOutput | None] = field(default_factory=list)


@dataclass(frozen=True)
class MovePlan:
    """Every rank moves to ``plan`` (another plan the engine was built with, as its
    string), starting in its prefill layout (``plan=auto``'s trial)."""

    plan: str


@dataclass(frozen=True)
class Stop:
    """The end of a run: the workers return (``error``: rank 0 failed; they raise it)."""

    error: str | None = None


class ControlKind(str, enum.Enum):
    """What a ``Control`` message asks of every rank."""

    KEEPALIVE = "keepalive"  # nothing: an idle serving loop's sign of life
    UPDATE_WEIGHTS = "update_weights"  # the pairs follow as one broadcast object
    UPDATE_FROM_DISTRIBUTED = "update_weights_from_distributed"  # args: names, dtypes, shapes
    INIT_UPDATE_GROUP = "init_weight_update_group"  # args: address, port, offset, world
    LOAD_WEIGHTS = "load_weights"  # args: path (a checkpoint folder every rank reads)
    SLEEP = "sleep"  # args: level
    WAKE_UP = "wake_up"  # args: tags
    LOAD_LORA = "load_lora"  # args: lora_name, lora_int_id, lora_path, busy (adapter ids)
    UNLOAD_LORA = "unload_lora"  # args: lora_int_id


@dataclass(frozen=True)
class Control:
    """A command every rank runs between two steps of a serving loop (``AsyncLLM``),
    with its arguments as JSON text."""

    kind: ControlKind
    args: str = "{}"


# What rank 0 broadcasts before each step of a run.
StepMessage = Step | Switch | MovePlan | Stop | Control


@dataclass
class SampledToken:
    """A sampled token and, if asked, its logprob and the top alternatives."""

    seq_id: int
    token_id: int
    logprob: float | None = None
    rank: int | None = None  # 1 = the most likely token (with logprob)
    top_logprobs: dict[int, float] = field(default_factory=dict)  # in rank order
    # with SamplingSpec.prompt_logprobs: per prompt position 1..L-1, the row
    # [actual id, logprob, rank, k top ids, k top logprobs]
    prompt_rows: list[list[float]] | None = None
    # with RunOptions.routed_experts: the step's tokens' expert ids, int16 bytes of
    # [tokens fed this step, MoE layers, top_k] (positions start_pos ..)
    routed: bytes | None = None


@dataclass
class RunnerOutput:
    """One replica's step result, sent from its last stage to rank 0."""

    tokens: list[SampledToken]


@dataclass(frozen=True)
class RankInfo:
    """Where this rank sits in the active layout."""

    layout: object  # the active config.ParallelConfig (this module imports nothing of ours)
    rank: int
    dp_rank: int
    tp_rank: int
    pp_rank: int
    tp_group: object  # torch ProcessGroup of this rank's TP peers
    prev_rank: int | None  # global rank of the previous pipeline stage (None on the first)
    next_rank: int | None  # global rank of the next pipeline stage (None on the last)
    ep_rank: int = 0  # place in the expert-parallel group (layouts with E)
    ep_group: object = None  # torch ProcessGroup of this rank's expert-parallel peers

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1
