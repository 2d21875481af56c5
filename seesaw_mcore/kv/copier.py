"""The tier copy engine: moves sequences' KV between the paged device cache and the node's
host tier (shared memory) or disk tier (DeepSpeed AIO), on the copy thread of ``CopyQueue``.

Each rank moves its own ``[its layers, k/v, its heads]`` part (``KVShardLayout``). Host tier:
one strided copy per run of tokens contiguous on both sides. Disk tier: per sequence, through
a page-locked staging record, all of a step's AIO ops in flight at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from seesaw_mcore.contract import DISK, HOST, KVMove, SlotRange
from seesaw_mcore.kv.disk_tier import DiskKVTier
from seesaw_mcore.kv.host_tier import HostKVBuffer
from seesaw_mcore.kv.transfer import CopyQueue


@dataclass(frozen=True)
class KVView:
    """This rank's paged cache under the active layout, as the copier addresses it."""

    rows: torch.Tensor  # [local layers, 2, NB * BS, Hkv/TP, D]
    block_size: int
    layer0: int  # global index of local layer 0 (the tiers hold every layer)
    heads: tuple[int, int]  # [h0, h1): this rank's KV heads


def _copy_runs(moves: list[KVMove], block_size: int) -> list[tuple[int, int, int]]:
    """Token runs contiguous in both the host slots and the flat ``[NB * BS]`` cache rows:
    ``(slot start, row start, length)``. Fresh block tables are mostly ascending, so a
    prefill step's moves usually collapse into a few runs."""
    runs: list[list[int]] = []
    for m in sorted(moves, key=lambda m: m.tier_slots.start):
        slot, left = m.tier_slots.start, m.tier_slots.length
        for b in m.block_table:
            n = min(block_size, left)
            if n <= 0:
                break
            row = b * block_size
            if runs and runs[-1][0] + runs[-1][2] == slot and runs[-1][1] + runs[-1][2] == row:
                runs[-1][2] += n
            else:
                runs.append([slot, row, n])
            slot, left = slot + n, left - n
    return [tuple(r) for r in runs]


def _copy_batched(cache: torch.Tensor, part: torch.Tensor, runs, to_tier: bool,
                  pinned: bool) -> None:
    """The device side of ``KVCopier._copy`` (GPU ranks): every run gathered into one
    contiguous buffer, so a call is one asynchronous DMA between the device and a page-locked
    staging buffer (PyTorch's pinned caching allocator keeps it until the copy is done) plus
    strided copies on each side, instead of one synchronous pageable copy (with a device
    temporary) per run.

    Args:
        cache: ``[l, 2, NB * BS, h, D]`` the device rows.
        part: ``[l, 2, h, S, D]`` the tier side.
        runs: ``(slot, cache row, n)`` token runs.
        to_tier: device -> tier.
        pinned: page-locked staging (False: tests on CPU).
    """
    total = sum(n for _, _, n in runs)
    nl, two, _, h, d = cache.shape
    staging = torch.empty(nl, two, total, h, d, dtype=cache.dtype, pin_memory=pinned)
    if to_tier:
        gathered = torch.cat([cache[:, :, row:row + n] for _, row, n in runs], dim=2)
        staging.copy_(gathered, non_blocking=pinned)
        if pinned:
            from deepspeed.accelerator import get_accelerator

            get_accelerator().current_stream().synchronize()  # the CPU side reads it next
        off = 0
        for slot, _, n in runs:
            part[:, :, :, slot:slot + n].copy_(staging[:, :, off:off + n].transpose(2, 3))
            off += n
        return
    off = 0
    for slot, _, n in runs:
        staging[:, :, off:off + n].copy_(part[:, :, :, slot:slot + n].transpose(2, 3))
        off += n
    dev = staging.to(cache.device, non_blocking=pinned)  # [l, 2, N, h, D]
    off = 0
    for _, row, n in runs:
        cache[:, :, row:row + n].copy_(dev[:, :, off:off + n])
        off += n


class KVCopier:
    """This rank's side of the KV tiers.

    Args:
        transfer: the copy queue (background thread or inline) and its statistics.
        head_dim: head size.
    """

    def __init__(self, transfer: CopyQueue, head_dim: int) -> None:
        self.transfer, self.head_dim = transfer, head_dim
        self.host: HostKVBuffer | None = None  # the node's host KV tier (Seesaw plans)
        self.disk: DiskKVTier | None = None  # the node's disk KV tier (optional)

    def swap(self, view: KVView, moves: list[KVMove], to_tier: bool,
             layers: range | None = None) -> None:
        """Moves this rank's ``[its layers, k/v, its heads]`` part of each sequence's KV
        between its device blocks and its tier slots (``layers``: only these local layers).
        Host tier: one strided copy per layer, K/V and run of tokens contiguous on both
        sides (adjacent slots and adjacent blocks). Disk tier: per sequence, through a
        page-locked staging record and AIO."""
        l0, (h0, h1) = view.layer0, view.heads
        layers = range(view.rows.shape[0]) if layers is None else layers
        for tier in (HOST, DISK):
            mine = [m for m in moves if m.tier_slots.tier == tier]
            if not mine:
                continue
            t0 = time.perf_counter()
            if tier == HOST:
                self._copy(view, self.host.tensor[:, :, h0:h1],
                           _copy_runs(mine, view.block_size), layers, l0, to_tier)
            else:  # whole records: every local layer
                self._disk_records(view, mine, to_tier)
            tokens = sum(m.tier_slots.length for m in mine)
            nbytes = 2 * len(layers) * tokens * (h1 - h0) * self.head_dim
            self.transfer.stats.tiers[tier].add(to_tier, nbytes * view.rows.element_size(),
                                                time.perf_counter() - t0)

    @staticmethod
    def _copy(view: KVView, side: torch.Tensor, runs, layers: range, l0: int,
              to_tier: bool) -> None:
        """Copies token runs ``(slot, cache row, n)`` of local ``layers`` between the paged
        cache and ``side`` ``[layers, 2, h, slots, D]`` (this rank's heads; local layer ``i``
        is ``side``'s layer ``l0 + i``): one strided copy per run, K and V of every layer
        at once."""
        cache = view.rows[layers.start:layers.stop]  # [l, 2, NB * BS, h, D]
        part = side[l0 + layers.start:l0 + layers.stop]  # [l, 2, h, S, D]
        if cache.device.type != "cpu":
            return _copy_batched(cache, part, runs, to_tier, pinned=True)
        for slot, row, n in runs:
            dev = cache[:, :, row:row + n].transpose(2, 3)  # [l, 2, h, n, D]
            tier = part[:, :, :, slot:slot + n]  # [l, 2, h, n, D]
            if to_tier:
                tier.copy_(dev)
            else:
                dev.copy_(tier, non_blocking=True)

    def _disk_records(self, view: KVView, moves: list[KVMove], to_tier: bool) -> None:
        """Sequences' parts (every local layer) between their blocks and their disk records,
        through page-locked staging; all of a step's AIO ops are in flight at once."""
        records = [m.tier_slots for m in moves]
        l0, (h0, h1) = view.layer0, view.heads
        layers = range(view.rows.shape[0])
        staging = self.disk.staging(len(layers), h1 - h0, records)  # each [l, 2, h, R, D]
        if not to_tier:
            self.disk.transfer(staging, records, l0, h0, write=False)
        for m, part in zip(moves, staging):
            local = KVMove(m.seq_id, SlotRange(0, m.tier_slots.length), m.block_table)
            self._copy(view, part, _copy_runs([local], view.block_size), layers, 0, to_tier)
        if to_tier:
            self.disk.transfer(staging, records, l0, h0, write=True)
