"""Batching code both schedulers share: growing running sequences (preempting on shortage),
splitting a step into pipeline micro-batches, and a sequence's entry in a step."""

from __future__ import annotations

import dataclasses
import itertools
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

from seesaw_mcore.config import SchedulerConfig
from seesaw_mcore.contract import KVMove, Phase, SamplingSpec, ScheduledSeq, SchedulerOutput
from seesaw_mcore.engine.request import Sequence
from seesaw_mcore.kv.block_pool import BlockPool, block_hashes
from seesaw_mcore.sampling_params import SamplingParams


@dataclass
class PrefillPack:
    """One replica's prefill step being packed, against the step budgets: at most
    ``max_prefill_tokens`` prompt tokens (a longer prompt still runs, alone) and, with the
    sequences already running on the replica, at most ``max_num_seqs``.

    Args:
        config: the budgets.
        running: sequences already running on the replica (they count against
            ``max_num_seqs``).
    """

    config: SchedulerConfig
    running: int = 0
    seqs: list[ScheduledSeq] = field(default_factory=list)
    swap_out: list[KVMove] = field(default_factory=list)  # KV leaving for a tier in the step
    tokens: int = 0

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` can join the step."""
        if self.seqs and self.tokens + num_tokens > self.config.max_prefill_tokens:
            return False
        return self.running + len(self.seqs) < self.config.max_num_seqs

    def add(self, entry: ScheduledSeq, swap_out: KVMove | None = None) -> None:
        self.seqs.append(entry)
        self.tokens += len(entry.token_ids)
        if swap_out is not None:
            self.swap_out.append(swap_out)

    def output(self, pp: int) -> SchedulerOutput | None:
        """The step, split into ``prefill_micro_batches`` per stage under PP; ``None`` if
        empty."""
        if not self.seqs:
            return None
        parts = prefill_parts(self.config, pp)
        return SchedulerOutput(Phase.PREFILL, split_micro_batches(self.seqs, parts, True),
                               swap_out=self.swap_out)


@dataclass
class PrefixStats:
    """Prefix-cache counters of a scheduler: prompt tokens given at (re)prefill, how many
    came from cached blocks, how many were computed."""

    queried: int = 0  # tokens of sequences at their (re)prefill
    hit: int = 0  # of those, taken from cached blocks

    def add(self, num_tokens: int, num_hit: int) -> None:
        self.queried += num_tokens
        self.hit += num_hit


def needs_prompt_logprobs(seq: Sequence) -> bool:
    """Whether this prefill of ``seq`` must return prompt logprobs: once per request,
    sample 0's first prefill (a recompute already has them)."""
    return (seq.params.prompt_logprobs is not None and seq.sample_index == 0
            and not seq.output_token_ids and seq.prompt_logprobs is None)


def prefix_hit(pool: BlockPool, seq: Sequence) -> list[int]:
    """The cached blocks a (re)prefill of ``seq`` can take: full blocks before its last
    token (which must be computed, for the logits) and before the first position whose
    prompt logprobs it returns (``prompt_logprobs_from``; vLLM's rule: those are
    computed), and those the pool's ``hit_filter`` accepts."""
    if not pool.enable_caching:
        return []
    n, bs = seq.num_tokens, pool.block_size
    limit = (n - 1) // bs
    if needs_prompt_logprobs(seq):
        limit = min(limit, max(seq.params.prompt_logprobs_from - 1, 0) // bs)
    hashes = block_hashes(seq.all_token_ids, bs, seq.block_hashes, seq.hash_root)[:limit]
    if pool.hit_filter is not None:
        hashes = list(itertools.takewhile(pool.hit_filter, hashes))
    return pool.match(hashes)


def take_blocks(pool: BlockPool, seq: Sequence, table: list[int], hit: list[int]) -> None:
    """Fills ``table`` for a prefill of ``seq``: the cached ``hit`` blocks shared, the rest
    newly allocated; its full blocks become findable (the caller checked there is room)."""
    if not pool.allocate_slots(table, seq.num_tokens, hit, seq.block_hashes):
        raise RuntimeError(f"no KV blocks for sequence {seq.seq_id} (a bug)")
    if not seq.output_token_ids:  # its first prefill
        seq.num_cached_tokens = len(hit) * pool.block_size


def grow_running(pool: BlockPool, running: list[Sequence],
                 preempt: Callable[[Sequence], None]) -> None:
    """Gives every running sequence the blocks for one more token; when they run out, the
    newest running sequence (maybe the one being grown) is removed and passed to
    ``preempt``, which must free its blocks. With prefix caching, a block the step fills
    becomes findable (its KV is written by the step)."""
    i, bs = 0, pool.block_size
    while i < len(running):
        seq = running[i]
        if seq.num_tokens <= len(seq.block_table) * bs or pool.allocate_slots(
                seq.block_table, seq.num_tokens):  # (most steps: room in its last block)
            i += 1
        else:
            preempt(running.pop())
    if pool.enable_caching:  # only those that run this step: a victim writes nothing
        for seq in running:
            if seq.num_tokens // bs > len(seq.block_hashes):
                pool.allocate_slots(seq.block_table, seq.num_tokens, hashes=block_hashes(
                    seq.all_token_ids, bs, seq.block_hashes, seq.hash_root))


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


_SPEC_HINTS = typing.get_type_hints(SamplingSpec)
# the spec's fields a request's SamplingParams gives by the same name (a sampling field is
# declared in both and read by the sampler: nothing here changes for it)
_FROM_PARAMS = [f.name for f in dataclasses.fields(SamplingSpec)
                if f.name in {g.name for g in dataclasses.fields(SamplingParams)}
                and f.name not in ("seed", "prompt_logprobs")]


def spec_values(seq: Sequence) -> list:
    """``seq``'s sampling spec as field values, the per-step fields at their defaults: the
    request's own fields by name (numbers as the spec's types), its resolved seed, and the
    prompt length when a penalty needs the token history."""
    p = seq.params
    fields = {n: _SPEC_HINTS[n](getattr(p, n)) if _SPEC_HINTS[n] in (int, float)
              else getattr(p, n) for n in _FROM_PARAMS}
    spec = SamplingSpec(seed=seq.seed, token_index=0, **fields,
                        prompt_len=len(seq.prompt_token_ids) if p.has_penalties else 0)
    return [getattr(spec, f.name) for f in dataclasses.fields(SamplingSpec)]


def scheduled(seq: Sequence, token_ids: list[int], start: int,
              block_table: list[int] | None = None) -> ScheduledSeq:
    """The step entry of ``seq``: feed ``token_ids`` at ``start`` (its own block table by
    default)."""
    p = seq.params
    base = seq.spec_base
    if base is None:  # its spec's field values but the per-step ones, made once
        base = seq.spec_base = spec_values(seq)
    spec = SamplingSpec(*base)
    spec.token_index = len(seq.output_token_ids)
    if p.has_penalties:  # the live token list (no copy)
        spec.history = seq.all_token_ids
    if spec.token_index < p.min_tokens:
        spec.banned = list(seq.min_tokens_banned)
    if needs_prompt_logprobs(seq):
        spec.prompt_logprobs = p.prompt_logprobs
    table = seq.block_table if block_table is None else block_table
    return ScheduledSeq(seq.seq_id, token_ids, start, list(table), spec, seq.lora)
