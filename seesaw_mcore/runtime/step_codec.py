"""The step messages and the sampled tokens as flat arrays: what rank 0 broadcasts each step
and what a replica's last stage sends back, without pickling an object tree.

``encode_step`` writes a ``StepMessage`` as one int64 array (floats by their bits, the rare
error or plan text as code points); ``decode_step`` reads it back into the same dataclasses.
Sampled tokens travel as one float64 array ``[N, 3 + 2k]``: token id, logprob (NaN: not
asked), its rank, then ``k`` top ids and ``k`` top logprobs; the receiver knows ``N`` and
``k`` from the step it sent.
"""

from __future__ import annotations

import math
import struct

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
    StepMessage,
    Stop,
    Switch,
)

_VERSION = 5
_KINDS = [Step, Switch, MovePlan, Stop, Control]
_CONTROLS = list(ControlKind)
_PHASES = [Phase.PREFILL, Phase.DECODE]
_TIERS = [HOST, DISK]
_F2I = struct.Struct("<d")
_I = struct.Struct("<q")


def _fbits(x: float) -> int:
    return _I.unpack(_F2I.pack(x))[0]


def _float(bits: int) -> float:
    return _F2I.unpack(_I.pack(bits))[0]


def encode_step(msg: StepMessage) -> np.ndarray:
    """``msg`` as a flat int64 array (see ``decode_step``): the format version, the kind
    (``Step``, ``Switch``, ``MovePlan``, ``Stop``, ``Control``), its fields, then its
    replicas."""
    out: list[int] = [_VERSION, _KINDS.index(type(msg))]
    if isinstance(msg, Control):
        out += [_CONTROLS.index(msg.kind), len(msg.args), *map(ord, msg.args)]
    elif isinstance(msg, Switch):
        out.append(_PHASES.index(msg.phase))
    elif isinstance(msg, (MovePlan, Stop)):
        text = msg.plan if isinstance(msg, MovePlan) else msg.error
        out += [-1] if text is None else [len(text), *map(ord, text)]
    replicas = (msg.replicas if isinstance(msg, Step)
                else msg.hand_back if isinstance(msg, Switch) else [])
    out.append(len(replicas))
    for rep in replicas:
        if rep is None:
            out.append(0)
            continue
        out += [1, _PHASES.index(rep.phase), len(rep.micro_batches)]
        for mb in rep.micro_batches:
            out.append(len(mb))
            for s in mb:
                p = s.sampling
                out += [s.seq_id, s.start_pos, len(s.token_ids), len(s.block_table),
                        _fbits(p.temperature), p.top_k, _fbits(p.top_p), p.seed, p.step,
                        -1 if p.logprobs is None else p.logprobs, _fbits(p.min_p),
                        _fbits(p.repetition_penalty), _fbits(p.presence_penalty),
                        _fbits(p.frequency_penalty), p.prompt_len, len(p.history),
                        len(p.banned), -1 if p.prompt_logprobs is None else p.prompt_logprobs]
                out += s.token_ids
                out += s.block_table
                out += p.history
                out += p.banned
        for moves in (rep.evict, rep.swap_in, rep.swap_out):
            out.append(len(moves))
            for m in moves:
                out += [m.seq_id, _TIERS.index(m.tier_slots.tier), m.tier_slots.start,
                        m.tier_slots.length, len(m.block_table), *m.block_table]
    return np.asarray(out, dtype=np.int64)


def decode_step(arr: np.ndarray) -> StepMessage:
    """The message that ``encode_step`` wrote."""
    v = arr.tolist()
    if v[0] != _VERSION:
        raise ValueError(f"step message format {v[0]}, expected {_VERSION}")
    kind, i = _KINDS[v[1]], 2
    phase, text = None, None
    if kind is Control:
        control, n = _CONTROLS[v[i]], v[i + 1]
        text, i = "".join(map(chr, v[i + 2:i + 2 + n])), i + 2 + n
    elif kind is Switch:
        phase, i = _PHASES[v[i]], i + 1
    elif kind in (MovePlan, Stop):
        n, i = v[i], i + 1
        text = None if n < 0 else "".join(map(chr, v[i:i + n]))
        i += max(n, 0)
    n_rep = v[i]
    i += 1
    replicas: list[SchedulerOutput | None] = []
    for _ in range(n_rep):
        present, i = v[i], i + 1
        if not present:
            replicas.append(None)
            continue
        rep_phase, n_mb = _PHASES[v[i]], v[i + 1]
        i += 2
        mbs = []
        for _ in range(n_mb):
            n_seq, i = v[i], i + 1
            mb = []
            for _ in range(n_seq):
                (sid, start, nt, nb, temp, top_k, top_p, seed, stp, lp, min_p, rep, pres, freq,
                 plen, nh, nban, plp) = v[i:i + 18]
                i += 18
                tokens, table = v[i:i + nt], v[i + nt:i + nt + nb]
                i += nt + nb
                history, banned = v[i:i + nh], v[i + nh:i + nh + nban]
                i += nh + nban
                spec = SamplingSpec(_float(temp), top_k, _float(top_p), seed, stp,
                                    None if lp < 0 else lp, _float(min_p), _float(rep),
                                    _float(pres), _float(freq), history, plen, banned,
                                    None if plp < 0 else plp)
                mb.append(ScheduledSeq(sid, tokens, start, table, spec))
            mbs.append(mb)
        lists = []
        for _ in range(3):
            n_mv, i = v[i], i + 1
            moves = []
            for _ in range(n_mv):
                sid, tier, start, length, nb = v[i:i + 5]
                moves.append(KVMove(sid, SlotRange(start, length, _TIERS[tier]),
                                    v[i + 5:i + 5 + nb]))
                i += 5 + nb
            lists.append(moves)
        replicas.append(SchedulerOutput(rep_phase, mbs, *lists))
    if i != len(v):
        raise ValueError(f"step message has {len(v) - i} trailing values")
    if kind is Control:
        return Control(control, text)
    if kind is Step:
        return Step(replicas)
    if kind is Switch:
        return Switch(phase, replicas)
    return MovePlan(text) if kind is MovePlan else Stop(text)


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
