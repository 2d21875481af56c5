"""Host KV tier: first-fit slot allocator, shared buffer with owner-only file, TP/PP slices
through KVShardLayout, and PhasePlan validation."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from seesaw_mcore.config import ParallelConfig, PhasePlan
from seesaw_mcore.contract import SlotRange
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.kv.host_tier import HostKVBuffer
from seesaw_mcore.kv.layout import KVShardLayout, shard_overlaps
from seesaw_mcore.kv.slots import SlotAllocator


def test_first_fit_and_merge():
    a = SlotAllocator(10)
    r1, r2, r3 = a.allocate(3), a.allocate(3), a.allocate(3)
    assert (r1.start, r2.start, r3.start) == (0, 3, 6) and a.used / a.num_slots == 0.9
    assert not a.can_allocate(2)
    a.free(r2)
    assert a.allocate(2) == SlotRange(3, 2)  # first fit reuses the hole
    a.free(SlotRange(3, 2))
    a.free(r1)
    a.free(r3)
    assert a._free == [(0, 10)] and a.used == 0  # everything merged back
    with pytest.raises(RuntimeError, match="no free range of 11 slots"):
        a.allocate(11)


def test_buffer_shared_owner_only_and_unlinked(tmp_path):
    shape = (5, 2, 4, 32, 8)  # [L, 2, H, S, D]
    owner = HostKVBuffer("kv-test", shape, torch.float32, create=True, shm_dir=str(tmp_path))
    peer = HostKVBuffer("kv-test", shape, torch.float32, create=False, shm_dir=str(tmp_path))
    assert stat.S_IMODE(os.stat(owner.path).st_mode) == 0o600
    # Prefill under P2 writes [its layers, all heads];
    # decode under T2 reads [all layers, its heads].
    p2, t2 = (KVShardLayout(ParallelConfig.parse(x), 5, 4) for x in ("P2", "T2"))
    slots = SlotRange(7, 6)
    full = torch.randn(5, 2, 4, 6, 8)
    s0, s1 = slots.start, slots.end
    for rank, buf in ((0, owner), (1, peer)):
        lo, hi = p2.layer_range(rank)
        h0, h1 = p2.head_range(rank)
        buf.tensor[lo:hi, :, h0:h1, s0:s1] = full[lo:hi, :, h0:h1]
    for rank, buf in ((0, peer), (1, owner)):
        lo, hi = t2.layer_range(rank)
        h0, h1 = t2.head_range(rank)
        assert torch.equal(buf.tensor[lo:hi, :, h0:h1, s0:s1], full[lo:hi, :, h0:h1])
    assert len(shard_overlaps(p2, t2)) == 4
    peer.close()
    owner.close()
    assert not os.path.exists(owner.path)


def test_buffer_too_big_for_shm(tmp_path):
    with pytest.raises(SeesawError, match=r"^host KV tier needs .* GiB but only .* GiB is free "
                       r"\(memory, .*\); lower cache.host_kv_tokens or cache.host_kv_gib$"):
        HostKVBuffer("huge", (80, 2, 8, 2**30, 128), torch.float16, True, str(tmp_path))


def test_phase_plan():
    plan = PhasePlan.parse("P2", "T2")
    assert str(plan) == "P2 -> T2" and not plan.is_static
    assert PhasePlan.parse("T2").is_static and str(PhasePlan.parse("T2")) == "T2"
    assert str(PhasePlan.parse("P4", "T2P2")) == "P4 -> T2P2"
    with pytest.raises(SeesawError, match=r"^plan P4 -> T2: prefill uses 4 ranks but decode "
                       r"uses 2; both phases run on the same ranks$"):
        PhasePlan.parse("P4", "T2")


@pytest.mark.parametrize("to_tier", [True, False])
def test_batched_gpu_copy_moves_what_the_per_run_copy_moves(to_tier):
    """The GPU ranks' batched copy (one staged DMA per call), run on CPU tensors, against
    the per-run copy the CPU ranks use: same bytes in the same places, nothing else touched."""
    from seesaw_mcore.contract import HOST, KVMove
    from seesaw_mcore.kv.copier import _copy_batched, _copy_runs

    bs, nb, h, d, layers, slots = 4, 12, 2, 8, 3, 40
    moves = [KVMove(1, SlotRange(3, 10, HOST), [5, 6, 0]),
             KVMove(2, SlotRange(20, 7, HOST), [9, 2])]
    runs = _copy_runs(moves, bs)
    results = []
    for batched in (False, True):
        cache = torch.randn(layers, 2, nb * bs, h, d, generator=torch.Generator().manual_seed(1))
        part = torch.randn(layers, 2, h, slots, d, generator=torch.Generator().manual_seed(2))
        if batched:
            _copy_batched(cache, part, runs, to_tier, pinned=False)
        else:
            for slot, row, n in runs:
                dev = cache[:, :, row:row + n].transpose(2, 3)
                tier = part[:, :, :, slot:slot + n]
                if to_tier:
                    tier.copy_(dev)
                else:
                    dev.copy_(tier)
        results.append((cache, part))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert len(runs) >= 3  # several runs, gathered into one buffer
