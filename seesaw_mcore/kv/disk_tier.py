"""Disk KV tier: one file per node under ``cache.disk_path``, read and written with DeepSpeed
AIO (libaio, ``O_DIRECT``) when the host tier is full.

Layout: a sequence's KV is one record of ``[L, 2, H_kv, R, D]`` at its slot range, where
``R`` is its token count rounded up to the tier's ``page_tokens`` (so every ``[head run, R,
D]`` chunk is a whole number of 4 KiB pages, as ``O_DIRECT`` needs). A rank's part of a record
- its layers, K/V, its heads - is one contiguous chunk per (layer, K/V): a PP rank writes and
reads few large chunks, a TP rank ``2 x layers`` of them.

The file is created owner-only by one rank, opened by every local rank and unlinked at once;
ranks address it as ``/proc/self/fd/N``, so nothing is left on disk after any exit, a crash
included.
"""

from __future__ import annotations

import math
import os
import shutil

import torch

from seesaw_mcore.contract import SlotRange
from seesaw_mcore.errors import SeesawError

ALIGN_BYTES = 4096  # O_DIRECT: buffer address, size and file offset multiples of this
AIO_BLOCK = 128 * 1024  # an op is split into requests of this size, up to
AIO_QUEUE_DEPTH = 32  # this many in flight


def load_aio():
    """DeepSpeed's async I/O op (JIT-built on first use).

    Raises:
        SeesawError: when libaio is missing (the op cannot be built).
    """
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from seesaw_mcore.jit_ops import load_op

    builder = AsyncIOBuilder()
    if not builder.is_compatible(verbose=False):
        raise SeesawError(
            "cache.disk_path needs DeepSpeed AIO, which needs libaio (Debian/Ubuntu: apt-get "
            "install libaio-dev; RHEL: yum install libaio-devel); unset cache.disk_path to "
            "run without the disk tier")
    return load_op(builder.name, lambda: builder.load(verbose=False))


def page_tokens(head_dim: int, dtype: torch.dtype) -> int:
    """Tokens per disk page: the fewest that make a one-head run ``ALIGN_BYTES``-aligned."""
    run = head_dim * dtype.itemsize
    return ALIGN_BYTES // math.gcd(ALIGN_BYTES, run)


def check_disk_path(path: str, nbytes: int) -> None:
    """A clear error for a disk path that is not a writable directory with room."""
    if not os.path.isdir(path):
        raise SeesawError(f"cache.disk_path {path!r} is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise SeesawError(f"cache.disk_path {path!r} is not writable")
    free = shutil.disk_usage(path).free
    if nbytes > 0.95 * free:
        raise SeesawError(
            f"disk KV tier needs {nbytes / 2**30:.2f} GiB but {path} has only "
            f"{free / 2**30:.2f} GiB free; lower cache.disk_kv_tokens or cache.disk_kv_gib")


class DiskKVTier:
    """This rank's handle on the node's disk tier file.

    Args:
        file: path of the file; ``create`` makes it (exactly one local rank, first).
        num_slots: token slots (a multiple of ``page``).
        dims: ``(layers, kv_heads, head_dim)`` of the model.
        dtype: KV element type.
        create: this rank creates the file.
        aio: the loaded AIO op (``load_aio()``).
    """

    def __init__(self, file: str, num_slots: int, dims: tuple[int, int, int],
                 dtype: torch.dtype, create: bool, aio) -> None:
        self.layers, self.heads, self.head_dim = dims
        self.dtype, self.num_slots = dtype, num_slots
        self.page = page_tokens(self.head_dim, dtype)
        self.token_bytes = 2 * self.layers * self.heads * self.head_dim * dtype.itemsize
        self.nbytes = num_slots * self.token_bytes
        self.path, self.creator = file, create
        if create:
            fd = os.open(file, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, self.nbytes)  # sparse: blocks are allocated as records land
        else:
            fd = os.open(file, os.O_RDWR)
        self._fd: int | None = fd
        self._io = aio.aio_handle(AIO_BLOCK, AIO_QUEUE_DEPTH, False, False, 1)
        self._staging: torch.Tensor | None = None  # page-locked, grown on demand

    @property
    def fd_path(self) -> str:
        """The open file, reachable even after it is unlinked."""
        return f"/proc/self/fd/{self._fd}"

    def unlink(self) -> None:
        """Removes the name (creator only) once every local rank has the file open."""
        if self.creator and os.path.exists(self.path):
            os.unlink(self.path)

    def close(self) -> None:
        """Closes this rank's descriptor (the data goes with the last one)."""
        self.unlink()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._staging = None

    def record_len(self, slots: SlotRange) -> int:
        """``R``: the record's token dimension (its length rounded up to a page)."""
        return -(-slots.length // self.page) * self.page

    def staging(self, layers: int, heads: int, records: list[SlotRange]) -> list[torch.Tensor]:
        """Page-locked ``[layers, 2, heads, R, D]`` buffers, one per record, for one rank's
        parts (valid until the next call)."""
        shapes = [(layers, 2, heads, self.record_len(r), self.head_dim) for r in records]
        sizes = [math.prod(sh) for sh in shapes]
        total = sum(sizes)
        if self._staging is None or self._staging.numel() < total:
            self._staging = None
            self._staging = self._io.new_cpu_locked_tensor(total, torch.empty(0, dtype=self.dtype))
        views, start = [], 0
        for shape, n in zip(shapes, sizes):  # each a whole number of pages: stays aligned
            views.append(self._staging[start:start + n].view(shape))
            start += n
        return views

    def _offset(self, layer: int, kv: int, head: int, slots: SlotRange) -> int:
        run = self.record_len(slots) * self.head_dim * self.dtype.itemsize
        return slots.start * self.token_bytes + ((layer * 2 + kv) * self.heads + head) * run

    def transfer(self, parts: list[torch.Tensor], records: list[SlotRange], layer0: int,
                 head0: int, write: bool) -> None:
        """Writes (or reads) a rank's parts ``[l, 2, h, R, D]`` (from ``staging``) of the
        records, starting at model layer ``layer0`` and KV head ``head0``. Chunks adjacent
        both in staging and in the file go as one op (a rank with every head moves each
        record's part in one piece; a rank with every layer too, runs of records); every op
        is submitted before one wait."""
        item, base = self.dtype.itemsize, self._staging.data_ptr()
        segments: list[list[int]] = []  # [staging element, file byte offset, elements]
        for part, slots in zip(parts, records):
            for i in range(part.shape[0]):
                for j in range(2):
                    chunk = part[i, j]  # [h, R, D], contiguous
                    start = (chunk.data_ptr() - base) // item
                    off, n = self._offset(layer0 + i, j, head0, slots), chunk.numel()
                    last = segments[-1] if segments else None
                    if last and last[0] + last[2] == start and last[1] + last[2] * item == off:
                        last[2] += n
                    else:
                        segments.append([start, off, n])
        op = self._io.async_pwrite if write else self._io.async_pread
        for start, off, n in segments:
            if op(self._staging[start:start + n], self.fd_path, off) != 0:
                self._io.wait()
                raise RuntimeError(f"disk KV tier: AIO {'write' if write else 'read'} at "
                                   f"offset {off} of {self.path} failed to start")
        done = self._io.wait()
        if done != len(segments):
            raise RuntimeError(f"disk KV tier: {done} of {len(segments)} AIO ops on "
                               f"{self.path} completed")
