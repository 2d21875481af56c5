"""PhaseScheduler: prefill into the host tier (then the disk tier), switch, admit with a
prefetching swap-in, dead slots reused only after a switch, swap and recompute preemption,
DP degree changing between the phases."""

from __future__ import annotations

from seesaw_mcore.config import PhasePlan, SchedulerConfig
from seesaw_mcore.contract import DISK, HOST, Phase, Switch
from seesaw_mcore.engine.request import SeqStatus
from seesaw_mcore.engine.scheduler import PhaseScheduler
from tests.unit.test_scheduler import create_requests


def create_scheduler(prefill="P2", decode="T2", prefill_blocks=16, decode_blocks=16,
                     host_slots=20, watermark_blocks=0, disk_slots=0, disk_align=1,
                     **cfg) -> PhaseScheduler:
    return PhaseScheduler(SchedulerConfig(**cfg), PhasePlan.parse(prefill, decode),
                          prefill_blocks, decode_blocks, 4, host_slots,
                          watermark_blocks=watermark_blocks, disk_slots=disk_slots,
                          disk_align=disk_align)


def switch_phase(msg) -> Phase | None:
    """The phase a scheduled ``Switch`` goes to (``None``: a step)."""
    return msg.phase if isinstance(msg, Switch) else None


def _sample(sched: PhaseScheduler, step) -> None:
    """Pretend the runner sampled token 7 for every scheduled sequence."""
    by_id = {s.seq_id: s for s in [*sched.offloaded, *[q for r in sched.running for q in r]]}
    for rep in step.replicas:
        for s in rep.seqs if rep else ():
            by_id[s.seq_id].output_token_ids.append(7)


def test_prefill_until_host_full_then_switch_and_admit():
    sched = create_scheduler(host_slots=20)
    seqs = create_requests([8, 8, 8])
    for s in seqs:
        sched.add(s)
    step = sched.schedule()
    [rep] = step.replicas
    assert rep.phase == Phase.PREFILL and [s.seq_id for s in rep.seqs] == [0, 1]
    assert [m.tier_slots.length for m in rep.swap_out] == [8, 8]  # all prompt KV to the host
    assert rep.swap_out[0].block_table != rep.swap_out[1].block_table
    assert sched.prefill_pools[0].num_free == 16  # device blocks were scratch only
    _sample(sched, step)
    assert switch_phase(sched.schedule()) == Phase.DECODE  # the third prompt does not fit
    [rep] = sched.schedule().replicas
    assert rep.phase == Phase.DECODE and [m.seq_id for m in rep.swap_in] == [0, 1]
    assert rep.seqs == []  # their KV is prefetched during this step; they decode from the next
    step = sched.schedule()
    [rep] = step.replicas
    assert rep.swap_in == [] and [s.start_pos for s in rep.seqs] == [8, 8]
    assert [s.token_ids for s in rep.seqs] == [[7], [7]]
    assert sched.host.used == 16  # freed only at the next switch (ranks may still read)
    _sample(sched, step)
    for s in seqs[:2]:
        sched.finish(s)
    assert switch_phase(sched.schedule()) == Phase.PREFILL and sched.host.used == 0
    assert [s.seq_id for s in sched.schedule().replicas[0].seqs] == [2]
    assert sched.num_switches == 2


def test_finished_at_first_token_frees_its_slots_at_the_switch():
    sched = create_scheduler(host_slots=8)
    a, b = create_requests([8, 8])
    sched.add(a)
    sched.add(b)
    _sample(sched, sched.schedule())
    sched.finish(a)  # EOS as its first token
    assert a.status == SeqStatus.FINISHED and not sched.offloaded
    assert switch_phase(sched.schedule()) == Phase.DECODE  # to release the dead slots
    assert switch_phase(sched.schedule()) == Phase.PREFILL  # nothing to decode
    assert [s.seq_id for s in sched.schedule().replicas[0].seqs] == [1]


def test_dp_changes_between_phases():
    sched = create_scheduler(prefill="D2", decode="T2", host_slots=64)
    seqs = create_requests([4, 4, 4, 4])
    for s in seqs:
        sched.add(s)
    step = sched.schedule()
    assert [len(r.seqs) for r in step.replicas] == [2, 2]  # balanced over both replicas
    _sample(sched, step)
    assert switch_phase(sched.schedule()) == Phase.DECODE
    [rep] = sched.schedule().replicas  # one decode replica takes all four
    assert len(rep.swap_in) == 4 and rep.seqs == []
    assert len(sched.schedule().replicas[0].seqs) == 4


def _decode_until_preempted(host_slots: int, **tiers):
    sched = create_scheduler(decode_blocks=6, host_slots=host_slots, **tiers)
    seqs = create_requests([7, 7])
    for s in seqs:
        sched.add(s)
    _sample(sched, sched.schedule())
    sched.schedule()  # switch
    sched.schedule()  # admission (prefetch)
    step = sched.schedule()
    assert len(step.replicas[0].seqs) == 2  # 2 + 2 blocks, two spare for growth
    steps = 0
    while sched.num_preemptions == 0:
        _sample(sched, step)
        step = sched.schedule()
        steps += 1
    # at 13 tokens each needs 4 blocks: the newest is preempted
    assert steps == 5 and [s.seq_id for s in step.replicas[0].seqs] == [0]
    assert seqs[1].num_preemptions == 1 and not seqs[1].block_table
    assert len(seqs[0].block_table) == 4
    return sched, seqs, step


def test_decode_preempts_newest_by_swapping_out():
    sched, (a, b), step = _decode_until_preempted(host_slots=64)
    [move] = step.replicas[0].preempt  # its 12 tokens of KV go to the host tier first
    assert move.seq_id == 1 and move.tier_slots.length == 12 and len(move.block_table) == 3
    assert step.replicas[0].swap_in == []  # never back in the step that evicts it
    assert b.status == SeqStatus.OFFLOADED and sched.num_swap_preemptions == 1
    sched.finish(a)
    step = sched.schedule()  # next step: back from the host tier, no recompute
    [back] = step.replicas[0].swap_in
    assert back.seq_id == 1 and back.tier_slots == move.tier_slots and not sched.waiting
    assert step.replicas[0].seqs == []
    assert [s.start_pos for s in sched.schedule().replicas[0].seqs] == [12]


def test_decode_preempts_for_recompute_when_host_tier_full():
    sched, (a, b), step = _decode_until_preempted(host_slots=14)
    assert step.replicas[0].preempt == [] and sched.num_swap_preemptions == 0
    assert sched.waiting[0] is b and b.status == SeqStatus.WAITING


def test_admission_keeps_the_watermark():
    sched = create_scheduler(decode_blocks=8, host_slots=64, watermark_blocks=4)
    seqs = create_requests([7, 7, 7])
    for s in seqs:
        sched.add(s)
    _sample(sched, sched.schedule())
    sched.schedule()  # switch
    step = sched.schedule()
    # each needs 2 blocks; the second would leave 4 free, the third only 2 (< watermark)
    assert [m.seq_id for m in step.replicas[0].swap_in] == [0, 1]
    assert [s.seq_id for s in sched.offloaded] == [2]
    step = sched.schedule()  # 0 and 1 decode; 2 still does not fit
    assert len(step.replicas[0].seqs) == 2 and step.replicas[0].swap_in == []
    sched.finish(seqs[0])
    assert [m.seq_id for m in sched.schedule().replicas[0].swap_in] == [2]


def test_prefill_spills_into_the_disk_tier_and_decodes_from_it():
    sched = create_scheduler(host_slots=16, disk_slots=40, disk_align=8)
    seqs = create_requests([8, 8, 5, 8])
    for s in seqs:
        sched.add(s)
    step = sched.schedule()
    [rep] = step.replicas
    tiers = [(m.tier_slots.tier, m.tier_slots.start, m.tier_slots.length) for m in rep.swap_out]
    # host full after two; the disk tier takes records rounded up to its 8-token pages
    assert tiers == [(HOST, 0, 8), (HOST, 8, 8), (DISK, 0, 5), (DISK, 8, 8)]
    assert sched.tiers[DISK].used == 16
    _sample(sched, step)
    assert switch_phase(sched.schedule()) == Phase.DECODE
    [rep] = sched.schedule().replicas
    assert [(m.seq_id, m.tier_slots.tier) for m in rep.swap_in] == [
        (0, HOST), (1, HOST), (2, DISK), (3, DISK)]
    _sample(sched, sched.schedule())
    for s in seqs:
        sched.finish(s)
    sched.add(create_requests([30])[0])
    assert switch_phase(sched.schedule()) == Phase.PREFILL
    assert sched.tiers[DISK].used == 0 and sched.host.used == 0
    [move] = sched.schedule().replicas[0].swap_out  # too long for the host: the disk tier
    assert move.tier_slots.tier == DISK and move.tier_slots.length == 30
    assert sched.tiers[DISK].used == 32


def test_swap_preemption_falls_back_to_the_disk_tier():
    sched, (a, b), step = _decode_until_preempted(host_slots=14, disk_slots=64, disk_align=4)
    [move] = step.replicas[0].preempt  # the host tier is full: its 12 tokens go to disk
    assert move.seq_id == 1 and move.tier_slots.tier == DISK and move.tier_slots.length == 12
    assert sched.num_swap_preemptions == 1 and not sched.waiting
    sched.finish(a)
    [back] = sched.schedule().replicas[0].swap_in
    assert back.tier_slots == move.tier_slots


def _run_policy(policy: str, num_prompts: int = 80, host_slots: int = 160, max_out: int = 8):
    """Drives the scheduler as the engine would (every scheduled sequence samples token 7,
    finishing at ``max_out``); returns (prefill -> decode switches, the outputs, handed back)."""
    sched = create_scheduler(prefill_blocks=64, decode_blocks=16, host_slots=host_slots,
                             policy=policy)
    seqs = create_requests([8] * num_prompts)
    for s in seqs:
        sched.add(s)
    to_decode, steps = 0, 0
    while sched.has_work():
        step = sched.schedule()
        steps += 1
        assert steps < 10_000, "no progress"
        to_decode += switch_phase(step) == Phase.DECODE
        if switch_phase(step) is not None:
            continue
        for rep in step.replicas:
            for s in rep.seqs if rep else ():
                seq = seqs[s.seq_id]
                assert s.start_pos == seq.num_tokens - len(s.token_ids)  # KV of the rest cached
                seq.output_token_ids.append(7)
                if len(seq.output_token_ids) == max_out:
                    sched.finish(seq)
    assert all(s.status == SeqStatus.FINISHED for s in seqs)
    return to_decode, [s.output_token_ids for s in seqs], sched.num_handed_back


def test_transition_minimizing_switches_about_once_per_tier_fill():
    # 80 prompts of 8 tokens = 4 host tiers of 160 slots; the device decodes ~4 at a time
    tm, out_tm, _ = _run_policy("transition_minimizing")
    pf, out_pf, _ = _run_policy("prefill_first")
    df, out_df, handed_df = _run_policy("decode_first")
    assert tm == df == 4  # k = 4 fills, one switch each
    assert pf >= 2 * tm  # prefill as soon as a prompt fits: many more switches
    assert handed_df == 0
    assert out_tm == out_pf == out_df == [[7] * 8] * 80


def test_transition_minimizing_hands_the_tail_back():
    # longer outputs: the tiers' load falls below 20% while a few sequences still decode;
    # those go back to a tier and the next prefill phase starts
    tm, out_tm, handed = _run_policy("transition_minimizing", max_out=24)
    df, out_df, _ = _run_policy("decode_first", max_out=24)
    assert handed > 0 and out_tm == out_df == [[7] * 24] * 80
    assert tm <= df + 2


def test_policy_errors():
    import pytest

    from seesaw_mcore.errors import SeesawError

    with pytest.raises(SeesawError, match="^scheduler.policy must be one of transition_minimizing"
                                          ", prefill_first, decode_first, got 'fifo'$"):
        SchedulerConfig(policy="fifo")
    with pytest.raises(SeesawError, match=r"^scheduler.refill_threshold must be in \[0, 1\], "
                                          r"got 1.5$"):
        SchedulerConfig(refill_threshold=1.5)
    with pytest.raises(SeesawError, match=r"^scheduler.max_wait_s must be >= 0 or null, "
                                          r"got -1$"):
        SchedulerConfig(max_wait_s=-1)


def _into_decode(sched, seqs):
    """Prefill ``seqs`` (they all fit the host tier), switch, admit, first decode step."""
    for s in seqs:
        sched.add(s)
    _sample(sched, sched.schedule())
    assert switch_phase(sched.schedule()) == Phase.DECODE
    sched.schedule()  # admissions, prefetched
    step = sched.schedule()
    _sample(sched, step)
    return step


def test_a_prompt_waits_at_most_max_wait_s_for_the_prefill_phase():
    """Transition-minimizing keeps decoding while the tiers are full; a prompt arriving
    meanwhile waits for them to drain, unless it has waited longer than max_wait_s."""
    import time

    for wait, expected in ((None, None), (5.0, Phase.PREFILL)):
        sched = create_scheduler(host_slots=64, decode_blocks=32, max_wait_s=wait)
        _into_decode(sched, create_requests([8, 8, 8, 8]))
        assert sched.tier_usage() > sched.config.refill_threshold
        [late] = create_requests([8])
        late.seq_id = 99
        late.arrival = time.monotonic() - 10  # arrived 10 s ago
        sched.add(late)
        assert switch_phase(sched.schedule()) == expected


def test_abort_frees_a_sequence_in_every_state():
    """Waiting, offloaded in the host tier, arriving (prefetched), running, swapped out:
    an abort frees its blocks and tier slots (dead slots at the next switch)."""
    sched = create_scheduler(host_slots=32, decode_blocks=32)
    seqs = create_requests([8, 8, 8, 8, 8, 8])
    for s in seqs[:4]:
        sched.add(s)
    _sample(sched, sched.schedule())  # 0..3 prefilled: offloaded
    for s in seqs[4:]:
        sched.add(s)  # waiting (the tier is full)
    sched.abort(seqs[4])
    assert seqs[4] not in sched.waiting
    assert switch_phase(sched.schedule()) == Phase.DECODE
    sched.abort(seqs[0])  # offloaded
    sched.schedule()  # 1..3 arriving
    sched.abort(seqs[1])  # arriving: its prefetched blocks freed
    step = sched.schedule()
    _sample(sched, step)
    sched.abort(seqs[2])  # running
    assert [s.status for s in seqs[:5]] == [SeqStatus.FINISHED] * 3 + [
        SeqStatus.RUNNING, SeqStatus.FINISHED]
    sched.finish(seqs[3])
    sched.abort(seqs[5])
    assert not sched.has_work()
    assert sched.decode_pools[0].num_free == 32 and sched.host.used > 0  # dead: until a switch
    sched.book.free_dead()
    assert sched.host.used == 0
