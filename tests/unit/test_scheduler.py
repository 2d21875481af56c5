"""Block pool and scheduler: budgets, phase split, micro-batches, recompute preemption."""

from __future__ import annotations

import pytest

from seesaw_mcore.config import SchedulerConfig
from seesaw_mcore.contract import Phase
from seesaw_mcore.engine.request import SeqStatus, Sequence
from seesaw_mcore.engine.scheduler import ReplicaScheduler
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.kv.block_pool import BlockPool
from seesaw_mcore.sampling_params import SamplingParams


def create_requests(lengths: list[int]) -> list[Sequence]:
    p = SamplingParams(temperature=0, max_tokens=100)
    return [Sequence(seq_id=i, request_index=i, sample_index=0, prompt_token_ids=[1] * n,
                     params=p, seed=0, max_tokens=100) for i, n in enumerate(lengths)]


def create_scheduler(num_blocks=8, block_size=4, pp=1, **cfg) -> ReplicaScheduler:
    return ReplicaScheduler(SchedulerConfig(**cfg), BlockPool(num_blocks, block_size), pp)


def _feed(sched: ReplicaScheduler, out) -> None:
    for s in out.seqs:  # pretend the runner sampled token 7 for each
        seq = next(q for q in sched.running if q.seq_id == s.seq_id)
        seq.output_token_ids.append(7)


def test_block_pool_verbs():
    pool = BlockPool(4, 4)
    table: list[int] = []
    assert pool.can_allocate(table, 16) and not pool.can_allocate(table, 17)
    assert pool.allocate_slots(table, 5)
    assert table == [0, 1] and pool.num_free == 2
    assert pool.allocate_slots(table, 8)  # still two blocks
    assert table == [0, 1]
    kept = list(table)
    pool.free(table)
    assert table == [] and pool.num_free == 4
    assert not pool.allocate_slots(table, 17) and table == []  # nothing taken
    with pytest.raises(RuntimeError, match=r"^KV block 1 freed with no user \(a double free"):
        pool.free(kept)


def test_prefill_budget_then_decode():
    sched = create_scheduler(num_blocks=32, max_prefill_tokens=10)
    for s in create_requests([4, 4, 4, 30]):
        sched.add(s)
    out = sched.schedule()
    assert out.phase == Phase.PREFILL and [s.seq_id for s in out.seqs] == [0, 1]
    _feed(sched, out)
    out = sched.schedule()
    assert out.phase == Phase.PREFILL and [s.seq_id for s in out.seqs] == [2]
    _feed(sched, out)
    out = sched.schedule()  # a single prompt longer than the budget still runs, alone
    assert [s.seq_id for s in out.seqs] == [3] and out.num_tokens == 30
    _feed(sched, out)
    out = sched.schedule()
    assert out.phase == Phase.DECODE and len(out.seqs) == 4
    assert all(len(s.token_ids) == 1 for s in out.seqs)
    assert out.seqs[0].start_pos == 4


def test_max_num_seqs():
    sched = create_scheduler(num_blocks=32, max_num_seqs=2)
    for s in create_requests([2, 2, 2]):
        sched.add(s)
    assert len(sched.schedule().seqs) == 2


def test_decode_micro_batches_split_running_over_pp():
    sched = create_scheduler(num_blocks=64, pp=2, prefill_micro_batches=2)
    for s in create_requests([3] * 5):
        sched.add(s)
    out = sched.schedule()
    # prefill: PP x prefill_micro_batches micro-batches (smaller pipeline bubble)
    assert out.phase == Phase.PREFILL and [len(mb) for mb in out.micro_batches] == [2, 1, 1, 1]
    _feed(sched, out)
    out = sched.schedule()
    assert out.phase == Phase.DECODE and [len(mb) for mb in out.micro_batches] == [3, 2]


def test_preempts_newest_and_recomputes():
    sched = create_scheduler(num_blocks=3, block_size=4)
    seqs = create_requests([4, 4, 4])
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert len(out.seqs) == 3
    _feed(sched, out)
    out = sched.schedule()  # each needs a 2nd block: newest preempted until the rest fit
    assert all(s.status == SeqStatus.WAITING and s.block_table == [] for s in seqs[1:])
    assert list(sched.waiting) == [seqs[1], seqs[2]]  # arrival order kept
    assert out.phase == Phase.DECODE and [s.seq_id for s in out.seqs] == [0]
    _feed(sched, out)
    sched.finish(seqs[0])
    out = sched.schedule()  # recompute: prompt + generated tokens in one prefill
    assert out.phase == Phase.PREFILL and out.seqs[0].token_ids == [1, 1, 1, 1, 7]
    assert out.seqs[0].sampling.token_index == 1


def test_config_errors():
    with pytest.raises(SeesawError, match="scheduler.max_num_seqs must be >= 1, got 0"):
        SchedulerConfig(max_num_seqs=0)
