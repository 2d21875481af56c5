"""One step's sampling settings as per-row tensors on the device (what the sampler's draw
and the processed logprobs read)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seesaw_mcore import h2d
from seesaw_mcore.contract import SamplingSpec


@dataclass
class SamplingBatch:
    """One step's sampling settings as per-row tensors on the device.

    Built from the rows' ``SamplingSpec`` in two host -> device copies.
    """

    temperature: torch.Tensor  # [N] float32, 0 = greedy
    top_p: torch.Tensor  # [N] float32, 1 = off
    min_p: torch.Tensor  # [N] float32, 0 = off
    top_k: torch.Tensor  # [N] int64, <= 0 = off
    seed: torch.Tensor  # [N] int64
    token_index: torch.Tensor  # [N] int64
    any_random: bool  # some row samples (else argmax only)
    any_filter: bool  # some sampled row uses top-k / top-p / min-p (else no sort)
    all_top_k: int  # every sampled row has top-k on: the largest k (0: some row has not)
    any_top_k: bool  # some sampled row has top-k on
    max_logprobs: int | None  # most top-k logprobs any row asks for; None: no row asks
    want_logprobs: list[bool]  # per row

    @classmethod
    def build(cls, specs: list[SamplingSpec], device: torch.device) -> "SamplingBatch":
        """Packs per-row settings (host Python over the rows, two tensor copies)."""
        floats = h2d.tensor([(s.temperature, s.top_p, s.min_p) for s in specs],
                            torch.float32, device)  # [N, 3]
        ints = h2d.tensor([(s.top_k, s.seed & ((1 << 63) - 1), s.token_index) for s in specs],
                          torch.int64, device)  # [N, 3]
        rand = [s.temperature > 0 for s in specs]
        filt = any(r and (s.top_k > 0 or s.top_p < 1 or s.min_p > 0)
                   for r, s in zip(rand, specs))
        asks = [s.logprobs for s in specs if s.logprobs is not None]
        ks = [s.top_k if s.top_k > 0 else 0 for r, s in zip(rand, specs) if r]
        return cls(floats[:, 0], floats[:, 1], floats[:, 2], ints[:, 0], ints[:, 1],
                   ints[:, 2], any(rand), filt, max(ks) if ks and min(ks) > 0 else 0,
                   any(k > 0 for k in ks),
                   max(asks) if asks else None,
                   [s.logprobs is not None for s in specs])
