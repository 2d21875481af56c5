"""Batching code both schedulers share: growing running sequences (preempting on shortage),
splitting a step into pipeline micro-batches, and a sequence's entry in a step."""

from __future__ import annotations

from collections.abc import Callable

from seesaw_mcore.config import SchedulerConfig
from seesaw_mcore.contract import SamplingSpec, ScheduledSeq
from seesaw_mcore.engine.request import Sequence
from seesaw_mcore.kv.block_pool import BlockPool


def grow_running(pool: BlockPool, running: list[Sequence],
                 preempt: Callable[[Sequence], None]) -> None:
    """Gives every running sequence the blocks for one more token; when they run out, the
    newest running sequence (maybe the one being grown) is removed and passed to
    ``preempt``, which must free its blocks."""
    i = 0
    while i < len(running):
        seq = running[i]
        if pool.can_allocate(seq.block_table, seq.num_tokens):
            pool.allocate(seq.block_table, seq.num_tokens)
            i += 1
        else:
            preempt(running.pop())


def prefill_parts(config: SchedulerConfig, pp: int) -> int:
    """Micro-batches of a prefill step: ``prefill_micro_batches`` per stage under PP."""
    return pp * config.prefill_micro_batches if pp > 1 else 1


def split_micro_batches(batch: list[ScheduledSeq], parts: int,
                        by_tokens: bool) -> list[list[ScheduledSeq]]:
    """Splits a step into at most ``parts`` micro-batches of balanced size (tokens in
    prefill, sequences in decode)."""
    parts = min(parts, len(batch))
    if parts <= 1:
        return [batch]
    weights = [len(s.token_ids) if by_tokens else 1 for s in batch]
    target = sum(weights) / parts
    out: list[list[ScheduledSeq]] = [[]]
    acc = 0.0
    for s, w in zip(batch, weights):
        if out[-1] and acc >= target * len(out) and len(out) < parts:
            out.append([])
        out[-1].append(s)
        acc += w
    return out


def scheduled(seq: Sequence, token_ids: list[int], start: int,
              block_table: list[int] | None = None) -> ScheduledSeq:
    """The step entry of ``seq``: feed ``token_ids`` at ``start`` (its own block table by
    default)."""
    p = seq.params
    spec = SamplingSpec(
        temperature=float(p.temperature), top_k=int(p.top_k), top_p=float(p.top_p),
        seed=seq.seed, step=len(seq.output_token_ids), logprobs=p.logprobs,
        min_p=float(p.min_p),
    )
    table = seq.block_table if block_table is None else block_table
    return ScheduledSeq(seq.seq_id, list(token_ids), start, list(table), spec)
