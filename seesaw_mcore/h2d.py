"""Host -> device copies of per-step data that do not block the host: staged through
page-locked memory (PyTorch's caching host allocator, which keeps the pinned buffer until
the copy has run) and issued asynchronously on the current stream. A plain ``.to(device,
non_blocking=True)`` from pageable memory waits for the copy; on CPU ranks nothing moves."""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a host tensor) on ``device``, without waiting for the copy."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def tensor(data, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.tensor(data, dtype=dtype)`` on ``device`` (see ``to_device``)."""
    return to_device(torch.tensor(data, dtype=dtype), device)
