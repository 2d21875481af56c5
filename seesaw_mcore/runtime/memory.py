"""A device's memory as sizing reads it (CUDA through DeepSpeed's accelerator, nothing on
CPU ranks: their budgets are configured, a fake in tests), what a KV block costs, and the
memory-profiling step's prompts."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Protocol

from seesaw_mcore.config import ModelConfig, ParallelConfig, kv_bytes_per_token
from seesaw_mcore.runtime import groups

if TYPE_CHECKING:
    import torch


def kv_bytes_per_block(
    cfg: ModelConfig, layout: ParallelConfig, block_size: int, dtype: torch.dtype
) -> int:
    """KV bytes one block costs on the rank with the most layers (first stage)."""
    return int(block_size * kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                               dtype.itemsize, layout))


def profile_lengths(max_tokens: int, max_len: int) -> list[int]:
    """The memory-profiling step's prompts: ``max_tokens`` tokens in prompts of at most
    ``max_len``."""
    n = math.ceil(max_tokens / max_len)
    return [min(max_len, max_tokens - i * max_len) for i in range(n)]


class DeviceMemory(Protocol):
    """What sizing reads of a device's memory (CUDA through DeepSpeed's accelerator; tests
    pass a fake)."""

    def total(self) -> int: ...
    def free(self) -> int: ...  # the driver's view: PyTorch's cached blocks count as used
    def allocated(self) -> int: ...  # bytes in live tensors
    def peak(self) -> int: ...  # most allocated since ``reset_peak``
    def reset_peak(self) -> None: ...
    def empty_cache(self) -> None: ...  # returns PyTorch's cached blocks to the driver


class AcceleratorMemory:
    """``DeviceMemory`` of this rank's device through DeepSpeed's accelerator."""

    def __init__(self, acc) -> None:
        self.acc = acc

    def total(self) -> int:
        return int(self.acc.total_memory())

    def free(self) -> int:
        if self.acc.device_name() == "cuda":  # the driver's count for this process's device
            import torch  # (DeepSpeed's NVML reading int()-parses CUDA_VISIBLE_DEVICES,

            return int(torch.cuda.mem_get_info()[0])  # which may hold GPU UUIDs)
        return int(self.acc.available_memory())

    def allocated(self) -> int:
        return int(self.acc.memory_allocated())

    def peak(self) -> int:
        return int(self.acc.max_memory_allocated())

    def reset_peak(self) -> None:
        self.acc.reset_peak_memory_stats()

    def empty_cache(self) -> None:
        self.acc.empty_cache()


def device_memory() -> DeviceMemory | None:
    """This rank's device memory, ``None`` on CPU ranks (their budget is configured).
    Callers look it up through the module (``memory.device_memory()``) so tests can fake it."""
    acc = groups.accelerator()
    return None if acc.device_name() == "cpu" else AcceleratorMemory(acc)

