"""Host KV tier: one shared-memory buffer per node, ``[layers, 2, kv_heads, slots, head_dim]``
(heads-major, so a TP rank's heads are contiguous). The scheduler-side allocator is in
``kv/slots.py``.
"""

from __future__ import annotations

import os
import sys

import torch

from seesaw_mcore.errors import SeesawError


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
        self.registered = register_host(self.tensor)  # page-locked for the GPU

    def unlink(self) -> None:
        """Removes the file (creator only); mappings stay valid until ``close``. Call once
        every local rank has mapped it."""
        if self.creator and os.path.exists(self.path):
            os.unlink(self.path)

    def close(self) -> None:
        """Unmaps (once nothing else references the tensor) and unlinks if still there."""
        if self.registered and self.tensor is not None:
            unregister_host(self.tensor)
            self.registered = False
        self.tensor = None
        self.unlink()


def register_host(t) -> bool:
    """Page-locks an existing host tensor's memory in place (``cudaHostRegister``) so
    copies between it and the GPU are DMA'd asynchronously instead of staged through a
    pageable bounce buffer; the host KV tier's shared-memory mapping is registered once this
    way. No-op on CPU ranks. Returns whether it is registered; a refusal (some sandboxes) is
    one warning and the tier stays pageable."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cuda" or t.numel() == 0:
        return False
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    if int(err) != 0:
        print(f"warning: cudaHostRegister of the host KV tier failed (error {int(err)}); its "
              "copies stay pageable (slower)", file=sys.stderr)
        return False
    return True


def unregister_host(t) -> None:
    """Undoes ``register_host`` (before the memory is unmapped)."""
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


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
