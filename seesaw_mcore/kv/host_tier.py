"""Host KV tier: one shared-memory buffer per node, ``[layers, 2, kv_heads, slots, head_dim]``
(heads-major, so a TP rank's heads are contiguous), and the scheduler-side first-fit
allocator of contiguous slot ranges.
"""

from __future__ import annotations

import bisect
import os
from dataclasses import dataclass

import torch

from seesaw_mcore.errors import SeesawError


HOST, DISK = "host", "disk"  # the KV tiers below the device cache


@dataclass(frozen=True)
class SlotRange:
    """``[start, start + length)`` token slots of one sequence in a KV tier."""

    start: int
    length: int
    tier: str = HOST

    @property
    def end(self) -> int:
        return self.start + self.length


class SlotAllocator:
    """First-fit allocator of contiguous slot ranges; frees merge with their neighbours.

    Args:
        num_slots: token slots in the tier.
        tier: the tier the ranges belong to (``HOST`` or ``DISK``).
        align: every range starts at a multiple of ``align`` and reserves a multiple of it
            (the disk tier's aligned records); the returned length is the one asked for.
    """

    def __init__(self, num_slots: int, tier: str = HOST, align: int = 1) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots, self.tier, self.align = num_slots - num_slots % align, tier, align
        self._free: list[tuple[int, int]] = [(0, self.num_slots)] if self.num_slots else []
        self.used = 0

    def reserved(self, length: int) -> int:
        """Slots a range of ``length`` tokens takes (rounded up to ``align``)."""
        return -(-length // self.align) * self.align

    @property
    def usage(self) -> float:
        """Fraction of slots in use."""
        return self.used / self.num_slots

    def can_allocate(self, length: int) -> bool:
        need = self.reserved(length)
        return any(n >= need for _, n in self._free)

    def allocate(self, length: int) -> SlotRange:
        """The first free range that fits ``length`` slots.

        Raises:
            RuntimeError: if no free range is long enough (call ``can_allocate`` first).
        """
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        need = self.reserved(length)
        for i, (start, n) in enumerate(self._free):
            if n >= need:
                if n == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, n - need)
                self.used += need
                return SlotRange(start, length, self.tier)
        raise RuntimeError(f"{self.tier} tier has no free range of {length} slots")

    def free(self, r: SlotRange) -> None:
        """Returns a range; adjacent free ranges merge."""
        i = bisect.bisect_left(self._free, (r.start, 0))
        start, n = r.start, self.reserved(r.length)
        end = start + n
        if i < len(self._free) and self._free[i][0] == end:  # merge right
            n += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == start:  # merge left
            start, left = self._free[i - 1]
            n += left
            self._free[i - 1] = (start, n)
        else:
            self._free.insert(i, (start, n))
        self.used -= self.reserved(r.length)


class HostKVBuffer:
    """The node's shared ``[L, 2, H_kv, S, D]`` buffer, a file in ``/dev/shm`` mapped by every
    local rank. Created owner-only by the creator; ``close()`` unmaps and (creator) unlinks.

    Args:
        name: file name under ``shm_dir``; every local rank must use the same one.
        shape: ``(layers, 2, kv_heads, slots, head_dim)``.
        dtype: element type.
        create: True on exactly one local rank (it must run before the others attach).
        shm_dir: where the file lives.
    """

    def __init__(self, name: str, shape: tuple[int, int, int, int, int], dtype: torch.dtype,
                 create: bool, shm_dir: str = "/dev/shm") -> None:
        self.path = os.path.join(shm_dir, name)
        self.shape, self.dtype, self.creator = shape, dtype, create
        nbytes = dtype.itemsize
        for dim in shape:
            nbytes *= dim
        self.nbytes = nbytes
        if create:
            _check_fits(nbytes, shm_dir)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, nbytes)
            finally:
                os.close(fd)
        elif not os.path.exists(self.path):
            raise RuntimeError(f"host KV buffer {self.path} does not exist (creator not ready?)")
        storage = torch.UntypedStorage.from_file(self.path, shared=True, nbytes=nbytes)
        self.tensor = torch.empty(0, dtype=dtype).set_(storage).view(shape)  # [L, 2, H, S, D]
        _touch_pages(self.tensor)  # every rank attaches before anything is written

    def unlink(self) -> None:
        """Removes the file (creator only); mappings stay valid until ``close``. Call once
        every local rank has mapped it."""
        if self.creator and os.path.exists(self.path):
            os.unlink(self.path)

    def close(self) -> None:
        """Unmaps (once nothing else references the tensor) and unlinks if still there."""
        self.tensor = None
        self.unlink()


def _touch_pages(t: torch.Tensor) -> None:
    """Writes one zero per page of a fresh (all-zero) mapping: the node commits the memory
    now (a node short of it fails at start, not mid-run) and this process's page tables are
    filled, so swaps run without page faults."""
    flat = t.view(-1)
    step = max(os.sysconf("SC_PAGE_SIZE") // t.element_size(), 1)
    flat[::step] = 0


def _check_fits(nbytes: int, shm_dir: str) -> None:
    """The buffer lives in RAM: refuse one larger than the free space of ``shm_dir`` or the
    node's available memory."""
    import psutil

    st = os.statvfs(shm_dir)
    free = min(st.f_bavail * st.f_frsize, psutil.virtual_memory().available)
    if nbytes > 0.9 * free:
        raise SeesawError(
            f"host KV tier needs {nbytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is "
            f"free (memory, {shm_dir}); lower cache.host_kv_tokens or cache.host_kv_gib")
