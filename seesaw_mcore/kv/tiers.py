"""The node's KV tiers below the device cache: sized, created by rank 0, attached by every
rank, and unlinked once all have them (each keeps its mapping or descriptor), so nothing is
left in ``/dev/shm`` or on disk even after a crash.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

from seesaw_mcore.config import CacheConfig, ModelConfig, kv_bytes_per_token
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.kv.disk_tier import DiskKVTier, check_disk_path, load_aio, page_tokens
from seesaw_mcore.kv.host_tier import HostKVBuffer

T = TypeVar("T")


def _token_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """One tier slot: a token's KV over every layer and KV head."""
    return int(kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                  dtype.itemsize))


def open_host_tier(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> HostKVBuffer:
    """The node's shared host tier ``[layers, 2, kv heads, slots, D]`` (``/dev/shm``)."""
    slots = cache.host_kv_tokens or int(cache.host_kv_gib * 2**30 // _token_bytes(cfg, dtype))
    shape = (cfg.num_layers, 2, cfg.num_kv_heads, max(slots, 1), cfg.head_dim)
    return _open_node_file(lambda name, create: HostKVBuffer(name, shape, dtype, create))


def open_disk_tier(cfg: ModelConfig, cache: CacheConfig, dtype: torch.dtype) -> DiskKVTier:
    """The node's disk-tier file under ``cache.disk_path`` (DeepSpeed AIO)."""
    path, slot_bytes = cache.disk_path, _token_bytes(cfg, dtype)
    page = page_tokens(cfg.head_dim, dtype)
    slots = cache.disk_kv_tokens or int(cache.disk_kv_gib * 2**30 // slot_bytes)
    slots -= slots % page
    if slots < page:
        raise SeesawError(f"the disk KV tier needs at least one page of {page} tokens; "
                          f"raise cache.disk_kv_tokens or cache.disk_kv_gib")
    dims = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)

    def make(name: str, create: bool) -> DiskKVTier:
        if create:
            check_disk_path(path, slots * slot_bytes)
        aio = load_aio()  # the creator builds the op first; the others load it
        return DiskKVTier(os.path.join(path, name + ".bin"), slots, dims, dtype, create, aio)

    return _open_node_file(make)


def _open_node_file(make: Callable[[str, bool], T]) -> T:
    """Rank 0 makes a node-shared tier file (``make(name, create=True)``) and broadcasts its
    name or its error; every rank attaches (``make(name, False)``); once all have, the name
    is unlinked."""
    box: list = [None, None]
    tier = None
    if dist.get_rank() == 0:
        box[0] = f"seesaw_kv_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        try:
            tier = make(box[0], True)
        except SeesawError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise SeesawError(box[1])
    if tier is None:
        tier = make(box[0], False)
    dist.barrier()  # every rank has it open
    tier.unlink()
    return tier
