"""The step messages and the sampled tokens as flat buffers: what rank 0 broadcasts each step
and what a replica's last stage sends back, without pickling an object tree.

Step messages are msgpack bytes written from the contract's dataclasses by their fields and
type hints (``_pack`` / ``_unpack``): a field added to a contract dataclass travels with no
change here. Requests keep their state on every rank (vLLM v1's ``NewRequestData`` once,
then per-step diffs): ``SeqMirror`` holds, for each sequence in flight, its block table, the
static part of its sampling spec and its token history, identically on rank 0 (the encoder)
and on every other rank (the decoder). A sequence's entry in a step (``WireSeq``) carries the
tokens it feeds, the blocks its table gained, the tokens its history gained and the spec's
per-step fields; the static spec only when it is new or changed. Finished and aborted
sequences are forgotten on every rank with the next step. So a step's message grows with the
running sequences, not with their context.

Sampled tokens travel as one float64 array ``[N, 3 + 2k]``: token id, logprob (NaN: not
asked), its rank, then ``k`` top ids and ``k`` top logprobs; the receiver knows ``N`` and
``k`` from the step it sent.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from dataclasses import dataclass, field

import msgpack
import numpy as np

from seesaw_mcore.contract import (
    Control,
    KVMove,
    MovePlan,
    Phase,
    SampledToken,
    SamplingSpec,
    ScheduledSeq,
    SchedulerOutput,
    Step,
    StepMessage,
    Stop,
    Switch,
)
from seesaw_mcore.runtime.wire import wire_pack, wire_unpack

_VERSION = 6
# the per-step fields of a sampling spec (sent with every entry); the rest is static
_DYNAMIC = ("token_index", "history", "banned", "prompt_logprobs")


@dataclass(slots=True)
class WireSeq:
    """One ``ScheduledSeq`` on the wire, as a diff against what every rank knows of it."""

    seq_id: int
    token_ids: list[int]  # fed this step
    start_pos: int
    kept_blocks: int  # the known block table's leading blocks it keeps
    new_blocks: list[int]  # then these
    new_history: list[int]  # appended to the known token history (penalties)
    token_index: int
    banned: list[int]
    prompt_logprobs: int | None
    spec: SamplingSpec | None = None  # the static spec when new or changed
    lora: int = 0


@dataclass(slots=True)
class WireReplica:
    """One ``SchedulerOutput`` on the wire."""

    phase: Phase
    micro_batches: list[list[WireSeq]]
    preempt: list[KVMove] = field(default_factory=list)
    swap_in: list[KVMove] = field(default_factory=list)
    swap_out: list[KVMove] = field(default_factory=list)


@dataclass(slots=True)
class WireStep:
    """A ``Step`` on the wire, with the sequences every rank forgets first."""

    forget: list[int]
    replicas: list[WireReplica | None]


@dataclass(slots=True)
class WireSwitch:
    """A ``Switch`` on the wire (its hand-back's outputs as ``WireReplica``)."""

    forget: list[int]
    phase: Phase
    hand_back: list[WireReplica | None]


_KINDS = [WireStep, WireSwitch, MovePlan, Stop, Control]


_SPEC_FIELDS = [f.name for f in dataclasses.fields(SamplingSpec)]
_STATIC = [n for n in _SPEC_FIELDS if n not in _DYNAMIC]
_static_key = operator.attrgetter(*_STATIC)  # the static fields' values, as one tuple
_DYN_AT = {n: _SPEC_FIELDS.index(n) for n in _DYNAMIC}


@dataclass
class _Known:
    table: list[int]
    key: tuple  # the static fields' values
    history: list[int]
    values: list | None = None  # decoder: the spec's field values (dynamic ones patched)


class SeqMirror:
    """What every rank knows of each sequence in flight (rank 0 and each other rank keep
    identical copies by applying the same messages)."""

    def __init__(self) -> None:
        self.known: dict[int, _Known] = {}
        self._forget: list[int] = []
        self.active = False  # rank 0: whether messages are sent at all (a world > 1)

    def forget(self, seq_id: int) -> None:
        """Rank 0: ``seq_id`` ended; every rank drops it with the next message."""
        if self.active:
            self._forget.append(seq_id)

    def clear(self) -> None:
        self.known.clear()
        self._forget.clear()

    def _take_forget(self) -> list[int]:
        out, self._forget = self._forget, []
        self._drop(out)
        return out

    def _drop(self, ids: list[int]) -> None:
        for sid in ids:
            self.known.pop(sid, None)

    # -- rank 0 -----------------------------------------------------------------------

    def to_wire(self, s: ScheduledSeq) -> WireSeq:
        p = s.sampling
        key = _static_key(p)
        k = self.known.get(s.seq_id)
        spec = None
        if k is None or k.key != key or len(p.history) < len(k.history):
            spec = dataclasses.replace(p, token_index=0, history=[], banned=[],
                                       prompt_logprobs=None)
            k = self.known[s.seq_id] = _Known([], key, [])
        n = len(k.table)
        kept = n if s.block_table[:n] == k.table else _common(k.table, s.block_table)
        new_blocks = s.block_table[kept:]
        new_history = p.history[len(k.history):]
        k.table = list(s.block_table)
        k.history.extend(new_history)
        return WireSeq(s.seq_id, list(s.token_ids), s.start_pos, kept, new_blocks,
                       new_history, p.token_index, list(p.banned), p.prompt_logprobs, spec, s.lora)

    def to_wire_replica(self, rep: SchedulerOutput | None) -> WireReplica | None:
        return _map_replica(rep, self.to_wire, WireReplica)

    # -- the other ranks --------------------------------------------------------------

    def from_wire(self, w: WireSeq) -> ScheduledSeq:
        k = self.known.get(w.seq_id)
        if w.spec is not None:
            k = self.known[w.seq_id] = _Known([], (), [],
                                              [getattr(w.spec, n) for n in _SPEC_FIELDS])
        if k is None:
            raise ValueError(f"step message for unknown sequence {w.seq_id}")
        if w.kept_blocks < len(k.table):
            k.table = k.table[:w.kept_blocks] + w.new_blocks
        else:  # grown in place (a step's entries are used within the step)
            k.table.extend(w.new_blocks)
        k.history.extend(w.new_history)  # in place: the spec below shares it
        values = k.values
        values[_DYN_AT["token_index"]], values[_DYN_AT["history"]] = w.token_index, k.history
        values[_DYN_AT["banned"]] = w.banned
        values[_DYN_AT["prompt_logprobs"]] = w.prompt_logprobs
        return ScheduledSeq(w.seq_id, w.token_ids, w.start_pos, k.table,
                            SamplingSpec(*values), w.lora)

    def from_wire_replica(self, w: WireReplica | None) -> SchedulerOutput | None:
        return _map_replica(w, self.from_wire, SchedulerOutput)


def _map_replica(rep, seq_fn, cls):
    """``rep`` (a replica's step, either form) as ``cls``, each sequence through ``seq_fn``."""
    if rep is None:
        return None
    return cls(rep.phase, [[seq_fn(s) for s in mb] for mb in rep.micro_batches],
               rep.preempt, rep.swap_in, rep.swap_out)


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def encode_step(msg: StepMessage, mirror: SeqMirror | None = None) -> bytes:
    """``msg`` as msgpack bytes (see the module doc); ``mirror`` (rank 0's) turns each
    sequence into its diff and is updated. Without one, a fresh mirror: every sequence is
    sent whole."""
    mirror = SeqMirror() if mirror is None else mirror
    if isinstance(msg, Step):
        wire = WireStep(mirror._take_forget(), [mirror.to_wire_replica(r)
                                                for r in msg.replicas])
    elif isinstance(msg, Switch):
        wire = WireSwitch(mirror._take_forget(), msg.phase,
                          [mirror.to_wire_replica(r) for r in msg.hand_back])
    else:
        wire = msg
        if isinstance(msg, Stop):
            mirror.clear()
    return msgpack.packb([_VERSION, _KINDS.index(type(wire)), wire_pack(wire)])


def decode_step(data: bytes, mirror: SeqMirror | None = None) -> StepMessage:
    """The message ``encode_step`` wrote, through this rank's ``mirror`` (updated)."""
    mirror = SeqMirror() if mirror is None else mirror
    version, kind, body = msgpack.unpackb(data)
    if version != _VERSION:
        raise ValueError(f"step message format {version}, expected {_VERSION}")
    wire = wire_unpack(body, _KINDS[kind])
    if isinstance(wire, WireStep):
        mirror._drop(wire.forget)
        return Step([mirror.from_wire_replica(r) for r in wire.replicas])
    if isinstance(wire, WireSwitch):
        mirror._drop(wire.forget)
        return Switch(wire.phase, [mirror.from_wire_replica(r) for r in wire.hand_back])
    if isinstance(wire, Stop):
        mirror.clear()
    return wire


def token_width(seqs: list[ScheduledSeq]) -> int:
    """Columns of the sampled-token array for these rows: ``3 + 2k``."""
    asks = [s.sampling.logprobs for s in seqs if s.sampling.logprobs is not None]
    return 3 + 2 * (max(asks) if asks else 0)


def encode_tokens(tokens: list[SampledToken], width: int) -> np.ndarray:
    """Sampled tokens as ``[N, width]`` float64 (token ids are exact in float64)."""
    k = (width - 3) // 2
    arr = np.full((len(tokens), width), math.nan)
    for row, t in zip(arr, tokens):
        row[0] = t.token_id
        if t.logprob is not None:
            row[1], row[2] = t.logprob, t.rank
            ids, vals = list(t.top_logprobs), list(t.top_logprobs.values())
            row[3:3 + len(ids)] = ids
            row[3 + k:3 + k + len(vals)] = vals
    return arr


def decode_tokens(arr: np.ndarray, seqs: list[ScheduledSeq]) -> list[SampledToken]:
    """The tokens ``encode_tokens`` wrote, for the rows ``seqs`` (in order)."""
    k = (arr.shape[1] - 3) // 2
    out = []
    for row, s in zip(arr.tolist(), seqs):
        tok = SampledToken(s.seq_id, int(row[0]))
        n = s.sampling.logprobs
        if n is not None:
            tok.logprob, tok.rank = row[1], int(row[2])
            tok.top_logprobs = dict(zip(map(int, row[3:3 + n]), row[3 + k:3 + k + n]))
        out.append(tok)
    return out


def prompt_shape(seqs: list[ScheduledSeq]) -> tuple[int, int]:
    """``(rows, columns)`` of a step's prompt-logprob array: one row per position 1..L-1 of
    each sequence that asks (in order), ``3 + 2k`` columns (``k``: the most any asks); rows
    is 0 when none asks."""
    asks = [s for s in seqs if s.sampling.prompt_logprobs is not None]
    if not asks:
        return 0, 0
    k = max(s.sampling.prompt_logprobs for s in asks)
    return sum(len(s.token_ids) - 1 for s in asks), 3 + 2 * k


def encode_prompt_rows(tokens: list[SampledToken], seqs: list[ScheduledSeq]) -> np.ndarray:
    """The prompt-logprob rows of ``tokens`` (those whose sequence asked) as one array."""
    n, width = prompt_shape(seqs)
    big = (width - 3) // 2
    arr = np.full((n, width), math.nan)
    i = 0
    for t in tokens:
        for row in t.prompt_rows or ():
            k = (len(row) - 3) // 2
            arr[i, :3 + k] = row[:3 + k]
            arr[i, 3 + big:3 + big + k] = row[3 + k:]
            i += 1
    return arr


def decode_prompt_rows(arr: np.ndarray, seqs: list[ScheduledSeq],
                       tokens: list[SampledToken]) -> None:
    """Gives each token of an asking sequence its rows back (in place)."""
    rows, i = arr.tolist(), 0
    big = (arr.shape[1] - 3) // 2
    for s, t in zip(seqs, tokens):
        k = s.sampling.prompt_logprobs
        if k is None:
            continue
        n = len(s.token_ids) - 1
        t.prompt_rows = [r[:3 + k] + r[3 + big:3 + big + k] for r in rows[i:i + n]]
        i += n
