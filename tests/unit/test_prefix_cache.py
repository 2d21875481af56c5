"""Prefix caching: chain hashes, the caching block pool, the host tier's shared spans, and
both schedulers driven by a fake runner whose "KV" of a position is the exact token prefix
it was computed from - so every read of a cached, shared, swapped or recomputed block is
checked, and a shared block being rewritten is caught."""

from __future__ import annotations

import random

import pytest

from seesaw_mcore.config import PhasePlan, SchedulerConfig
from seesaw_mcore.contract import DISK, SlotRange, Switch
from seesaw_mcore.engine.request import Sequence
from seesaw_mcore.engine.scheduler import PhaseScheduler, ReplicaSchedulers
from seesaw_mcore.kv.block_pool import BlockPool, block_hashes
from seesaw_mcore.kv.tier_kv import TierKV
from seesaw_mcore.sampling_params import SamplingParams

BS = 4
DISK_ALIGN = 8


def test_chain_hash_names_the_whole_prefix():
    a = block_hashes(list(range(12)), BS, [])
    b = block_hashes([0, 1, 2, 3, 9, 5, 6, 7, 8, 9, 10, 11], BS, [])
    assert len(a) == 3 and a[0] == b[0] and a[1] != b[1] and a[2] != b[2]  # parent differs
    grown: list[bytes] = []
    block_hashes(list(range(6)), BS, grown)  # one full block, then two more as it grows
    assert block_hashes(list(range(13)), BS, grown) == a
    assert len({*a, *b}) == 5 and all(len(h) == 16 for h in a)


def test_pool_shares_caches_and_evicts_least_recent_tails_first():
    pool = BlockPool(6, BS, enable_caching=True)
    toks = list(range(10))
    hashes = block_hashes(toks, BS, [])
    first: list[int] = []
    assert pool.allocate_slots(first, 10, hashes=hashes)
    assert pool.match(hashes) == first[:2] and pool.num_free == 3
    second: list[int] = []
    hit = pool.match(hashes[:1])
    assert pool.can_allocate(second, 10, hit)
    assert pool.allocate_slots(second, 10, hit)
    assert second[0] == first[0] and second[1:] != first[1:] and pool.num_free == 1
    head = first[0]
    pool.free(first)  # block 0 still used by `second`; first's tail blocks stay cached
    assert pool.num_free == 3 and pool.num_cached == 2 and pool.in_use(head)
    pool.free(second)
    assert pool.num_free == 6 and pool.match(hashes) == [0, 1]  # KV kept after the last user
    idle_hit = pool.match(hashes)
    assert pool.can_allocate([], 4 * 6, idle_hit) and not pool.can_allocate([], 4 * 7, idle_hit)
    taken: list[int] = []
    assert pool.allocate_slots(taken, 4 * 5)  # four never-used blocks, then the LRU tail (block 1)
    assert pool.num_evicted == 1 and pool.match(hashes) == [0]
    pool.reset_cache()
    assert pool.match(hashes) == [] and pool.num_free == 1


def test_pool_without_caching_never_hits():
    pool = BlockPool(4, BS)
    t: list[int] = []
    assert pool.allocate_slots(t, 8, hashes=block_hashes(list(range(8)), BS, []))
    assert pool.match(block_hashes(list(range(8)), BS, [])) == []


def test_tier_stores_a_shared_prefix_once():
    slots = iter([SlotRange(0, 10), SlotRange(10, 3), SlotRange(13, 10)])
    kv = TierKV(lambda n: next(slots), BS, sharing=True)
    a = block_hashes(list(range(10)), BS, [])
    b = block_hashes(list(range(8)) + [50, 51, 52], BS, [])
    pa, first_a = kv.store(a, 10)
    pb, first_b = kv.store(b, 11)  # blocks 0-1 in a's span: only 3 tokens written
    assert first_a == 0 and first_b == 8 and pa[0].span.users == 2
    assert [(p.slots().start, p.slots().length, p.pos) for p in pb] == [(0, 8, 0), (10, 3, 8)]
    assert kv.shared_tokens == 8
    assert kv.release(pa) == []  # b still reads a's span
    assert kv.release(pb) == [SlotRange(0, 10), SlotRange(10, 3)] and kv.index == {}
    pc, first_c = kv.store(a, 10)
    assert first_c == 0  # nothing left to share


# -- the schedulers on a fake runner ----------------------------------------------------


class FakeKV:
    """Device caches (one per layout) and the host tier as dicts of slot -> the token
    prefix whose KV it holds; runs steps the way the model runner does."""

    def __init__(self) -> None:
        self.devices: dict[int, dict[int, tuple]] = {}  # per DP replica
        self.device: dict[int, tuple] = {}  # the replica being run
        self.host: dict[tuple[str, int], tuple] = {}  # (tier, slot) -> KV
        self.writes = 0
        self.step_rows: set[int] = set()

    def move(self, m, to_tier: bool) -> None:
        if m.tier_slots.tier == DISK:  # whole O_DIRECT records: page-aligned starts
            assert m.tier_slots.start % DISK_ALIGN == 0, m
        for j in range(m.tier_slots.length):
            row = m.block_table[j // BS] * BS + j % BS
            slot = (m.tier_slots.tier, m.tier_slots.start + j)
            if to_tier:
                self.host[slot] = self.device[row]
            else:
                self.device[row] = self.host[slot]

    def forward(self, s, seq: Sequence, protected: dict[int, tuple]) -> None:
        toks = seq.all_token_ids
        for p in range(s.start_pos):  # cached context: read in place
            row = s.block_table[p // BS] * BS + p % BS
            assert self.device.get(row) == tuple(toks[:p + 1]), (seq.seq_id, p)
        for p in range(s.start_pos, s.start_pos + len(s.token_ids)):
            row = s.block_table[p // BS] * BS + p % BS
            new = tuple(toks[:p + 1])
            owner, kept = protected.get(row, (seq.seq_id, new))
            assert owner == seq.seq_id or kept == new, (
                f"sequence {seq.seq_id} rewrote KV that sequence {owner} holds")
            assert row not in self.step_rows, "two writers of one slot in a step"
            self.step_rows.add(row)
            self.device[row] = new
            self.writes += 1


def _requests(num_questions=6, n=3, prefix_len=13, max_tokens=6, seed=0) -> list[Sequence]:
    rng = random.Random(seed)
    shot = [rng.randrange(50) for _ in range(prefix_len)]
    seqs = []
    for q in range(num_questions):
        prompt = shot + [rng.randrange(50) for _ in range(rng.randrange(1, 9))]
        p = SamplingParams(n=n, max_tokens=max_tokens)
        seqs += [Sequence(seq_id=len(seqs) + k, request_index=q, sample_index=k,
                          prompt_token_ids=prompt, params=p, seed=k, max_tokens=max_tokens)
                 for k in range(n)]
    return seqs


def _run(sched, seqs: list[Sequence]) -> FakeKV:
    """Drives ``sched`` to the end; every sequence's k-th token is a function of its id."""
    kv, by_id = FakeKV(), {s.seq_id: s for s in seqs}
    for s in seqs:
        sched.add(s)
    for _ in range(10_000):
        if not sched.has_work():
            return kv
        step = sched.schedule()
        for r, rep in enumerate(step.hand_back if isinstance(step, Switch) else step.replicas):
            kv.device = kv.devices.setdefault(r, {})
            for m in rep.preempt if rep else ():
                kv.move(m, to_tier=True)
        if isinstance(step, Switch):
            kv.devices.clear()  # the other layout owns the device memory now
            continue
        for r, rep in enumerate(step.replicas):
            if rep is None:
                continue
            kv.device = kv.devices.setdefault(r, {})
            for m in rep.swap_in:
                kv.move(m, to_tier=False)
            # slot -> (holder, its KV) for every computed position of every sequence
            # holding blocks on this replica: no other sequence may change it
            protected: dict[int, tuple] = {}
            steps = {s.seq_id: s for s in rep.seqs}
            for q in by_id.values():
                s = steps.get(q.seq_id)
                table, done = ((s.block_table, s.start_pos) if s is not None else
                               (q.block_table, q.num_tokens - 1))
                if s is None and (q.replica != r or q.finish_reason is not None):
                    continue
                for p in range(min(done, len(table) * BS)):
                    protected[table[p // BS] * BS + p % BS] = (q.seq_id, tuple(
                        q.all_token_ids[:p + 1]))
            kv.step_rows = set()
            for s in rep.seqs:
                kv.forward(s, by_id[s.seq_id], protected)
            for m in rep.swap_out:
                kv.move(m, to_tier=True)
        for rep in step.replicas:
            for s in rep.seqs if rep else ():
                seq = by_id[s.seq_id]
                seq.output_token_ids.append((seq.seq_id * 7 + seq.num_tokens) % 50)
                if len(seq.output_token_ids) >= seq.max_tokens:
                    seq.finish_reason = "length"
                    sched.finish(seq)
    raise AssertionError("scheduler did not finish")


@pytest.mark.parametrize("dp,num_blocks", [(1, 64), (1, 9), (2, 64), (2, 10)])
def test_static_scheduler_shares_and_reads_exact_kv(dp, num_blocks):
    seqs = _requests()
    sched = ReplicaSchedulers(SchedulerConfig(max_num_seqs=8), dp, 1, num_blocks, BS,
                              enable_caching=True)
    kv = _run(sched, seqs)
    p = sched.prefix
    assert p.hit > 0
    if num_blocks == 64:  # no preemption: prompts' full blocks computed once per replica
        assert sched.num_preemptions == 0
        prompt = sum(len(s.prompt_token_ids) for s in seqs[::3])
        assert p.queried - p.hit < prompt  # n=3 samples and the shared prefix
    else:
        assert sched.num_preemptions > 0  # recompute preemption re-reads cached blocks
    off = ReplicaSchedulers(SchedulerConfig(max_num_seqs=8), dp, 1, num_blocks, BS)
    assert _run(off, _requests()).writes > kv.writes
    assert off.prefix.hit == 0


@pytest.mark.parametrize("plan,host_slots,decode_blocks,disk_slots", [
    ("P2:T2", 400, 40, 0), ("P2:T2", 60, 12, 0), ("P2:T2", 40, 9, 0), ("D2:T2", 60, 12, 0),
    ("P2:D2", 40, 9, 0), ("D2:D2", 30, 8, 0), ("P2:T2", 24, 9, 96)])
@pytest.mark.parametrize("seed", [0, 1])
def test_seesaw_scheduler_shares_across_tiers_and_switches(plan, host_slots, decode_blocks,
                                                           disk_slots, seed):
    def run(caching: bool):
        sched = PhaseScheduler(SchedulerConfig(max_num_seqs=8), PhasePlan.from_string(plan),
                               32, decode_blocks, BS, host_slots, watermark_blocks=1,
                               disk_slots=disk_slots, disk_align=DISK_ALIGN,
                               enable_caching=caching)
        return sched, _run(sched, _requests(num_questions=8, seed=seed))

    sched, kv = run(True)
    assert sched.prefix.hit > 0 and sched.book.tier_kv.shared_tokens > 0
    assert not sched.book._kv  # every span released ...
    assert all(t.used == 0 for t in sched.tiers.values()) or sched.book.dead  # ... or dying
    if host_slots < 100:
        assert sched.num_switches > 2
    off, kv_off = run(False)
    assert kv_off.writes > kv.writes and off.book.tier_kv.shared_tokens == 0


def test_prompt_logprobs_positions_are_computed():
    """A request that returns prompt logprobs takes no cached block at or after the first
    position it scores (vLLM: those positions are computed)."""
    sched = ReplicaSchedulers(SchedulerConfig(), 1, 1, 32, BS, enable_caching=True)
    toks = list(range(20))
    warm = Sequence(0, 0, 0, toks, SamplingParams(max_tokens=1), 0, 1)
    scored = Sequence(1, 1, 0, toks, SamplingParams(max_tokens=1, prompt_logprobs=0,
                                                    prompt_logprobs_from=10), 0, 1)
    full = Sequence(2, 2, 0, toks, SamplingParams(max_tokens=1, prompt_logprobs=1), 0, 1)
    starts = []
    for seq in (warm, scored, full):
        sched.add(seq)
        step = sched.schedule()
        starts.append(step.replicas[0].seqs[0].start_pos)
        seq.output_token_ids.append(1)
        sched.finish(seq)
    assert starts == [0, 8, 0]  # 8: the full blocks before position 9 (logits for 10)
    assert len(sched.replicas[0].pool.match(block_hashes(toks, BS, []))) == 5


def test_hash_chains_of_the_tests_prompts_never_collide():
    """Every full-block prefix of every prompt the tests run (and of random ones): equal
    chain hashes only for equal token prefixes."""
    from tests.distributed.engine_job import PROMPTS
    from tests.distributed.prefix_job import PROMPTS as SHARED
    from tests.distributed.seesaw_job import POLICY_PROMPTS

    rng = random.Random(3)
    prompts = [*PROMPTS, *SHARED, *POLICY_PROMPTS,
               *([rng.randrange(5) for _ in range(rng.randrange(40))] for _ in range(500))]
    seen: dict[bytes, tuple] = {}
    for bs in (1, 4, 16):
        for p in prompts:
            for i, h in enumerate(block_hashes(p, bs, [])):
                prefix = (bs, tuple(p[:(i + 1) * bs]))
                assert seen.setdefault(h, prefix) == prefix
    assert len(seen) > 1000


def test_dp_routes_shared_contexts_together_before_they_are_computed():
    """Multiple-choice style: 4 requests per context, all queued before any step. Each
    context's requests go to one replica (its prefix is pending there), the contexts
    alternate between the two replicas (least loaded), and a request with nothing shared
    goes to the least loaded replica."""
    sched = ReplicaSchedulers(SchedulerConfig(), 2, 1, 64, BS, enable_caching=True)
    rng = random.Random(1)
    seqs = []
    for _ in range(4):
        ctx = [rng.randrange(50) for _ in range(13)]
        for c in range(4):
            seqs.append(Sequence(len(seqs), len(seqs), 0, ctx + [100 + c, 101], SamplingParams(),
                                 0, 4))
    for s in seqs:
        sched.add(s)
    replicas = [s.replica for s in seqs]
    assert [len(set(replicas[i:i + 4])) for i in range(0, 16, 4)] == [1, 1, 1, 1]
    assert replicas[::4] == [0, 1, 0, 1]
    step = sched.schedule()  # each replica computes each of its contexts once
    for rep in step.replicas:
        starts = [s.start_pos for s in rep.seqs]
        assert starts == [0, 12, 12, 12, 0, 12, 12, 12]
    assert not any(sched._pending)  # prefilled: no longer pending


def test_the_cache_manager_keeps_its_books_under_random_operations():
    """Property test: random prompts over a small alphabet (so prefixes are shared) are
    admitted (longest cached prefix shared), grown a token at a time, freed, or the cache is
    reset, in random order. After every operation the books balance (no block both free and
    cached or used, no count negative, no block lost) and a sequence only ever writes blocks
    it alone holds."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    op = st.tuples(st.sampled_from(["add", "grow", "free", "reset"]),
                   st.lists(st.integers(0, 2), min_size=1, max_size=14), st.integers(0, 99))

    @settings(max_examples=150, deadline=None)
    @given(st.lists(op, min_size=1, max_size=60))
    def run(ops):
        pool = BlockPool(12, BS, enable_caching=True)
        live: list[tuple[list[int], list[int], list[bytes]]] = []  # (tokens, table, hashes)
        for kind, toks, pick in ops:
            if kind == "add":
                hashes = block_hashes(toks, BS, [])
                hit = pool.match(hashes[:(len(toks) - 1) // BS])
                table: list[int] = []
                if pool.allocate_slots(table, len(toks), hit, hashes):
                    for pos in range(len(hit) * BS, len(toks)):  # what the prefill writes
                        assert pool.writable(table, pos)
                    live.append((list(toks), table, hashes))
            elif kind == "grow" and live:
                toks, table, hashes = live[pick % len(live)]
                toks.append(pick % 3)
                if pool.allocate_slots(table, len(toks), hashes=block_hashes(toks, BS, hashes)):
                    assert pool.writable(table, len(toks) - 1)
                else:
                    toks.pop()
            elif kind == "free" and live:
                pool.free(live.pop(pick % len(live))[1])
            elif kind == "reset":
                pool.reset_cache()
            pool.check()
        for _, table, _ in live:
            pool.free(table)
        pool.check()
        assert pool.num_free == 12

    run()


def test_a_same_step_reader_of_a_block_runs_after_its_writer():
    """Blocks become findable when scheduled, before the step writes them: a prompt later
    in the same prefill step may share them. Safe only because the reader comes after the
    writer: in a later micro-batch (a stage runs micro-batches in order) or in the same one
    (attention writes a layer's KV before it reads). Checked over prefill steps of n
    samples and shared few-shot prefixes split into pipeline micro-batches."""
    rng = random.Random(3)
    for trial in range(40):
        sched = ReplicaSchedulers(SchedulerConfig(max_prefill_tokens=64, max_num_seqs=16,
                                                  prefill_micro_batches=2), 1, 2, 64, BS,
                                  enable_caching=True)
        shared = [rng.randrange(3, 50) for _ in range(rng.randint(4, 20))]
        p = SamplingParams(temperature=0.8, max_tokens=4)
        for i in range(rng.randint(2, 8)):
            toks = shared + [rng.randrange(3, 50) for _ in range(rng.randint(1, 9))]
            sched.add(Sequence(seq_id=i, request_index=i // 2, sample_index=i % 2,
                               prompt_token_ids=toks, params=p, seed=i, max_tokens=4))
        [rep] = sched.schedule().replicas
        writer: dict[int, int] = {}  # block -> micro-batch writing it
        for mb_index, mb in enumerate(rep.micro_batches):
            for s in mb:
                end = s.start_pos + len(s.token_ids)
                for b in {s.block_table[pos // BS] for pos in range(s.start_pos, end)}:
                    writer.setdefault(b, mb_index)
        for mb_index, mb in enumerate(rep.micro_batches):
            for s in mb:
                for b in s.block_table[:s.start_pos // BS]:  # read, not written, by it
                    assert writer.get(b, -1) <= mb_index, (trial, b)


def test_the_hash_root_keys_blocks_by_weights_version():
    """A block cached under one weights version is not found by a request of the next
    (its hash chain starts from another root), with no flush; the first version keeps the
    plain root, so existing hashes stay as they were."""
    from seesaw_mcore.kv.block_pool import ROOT_HASH, cache_root

    toks = list(range(12))
    pool = BlockPool(8, BS, enable_caching=True)
    old = block_hashes(toks, BS, [], cache_root(0))
    assert cache_root(0) == ROOT_HASH and old == block_hashes(toks, BS, [])
    assert pool.allocate_slots([], 12, hashes=old)
    new = block_hashes(toks, BS, [], cache_root(1))
    assert pool.match(old) != [] and pool.match(new) == []
    assert len({cache_root(1), cache_root(2), cache_root(1, adapter="a"),
                cache_root(1, salt="s")}) == 4
