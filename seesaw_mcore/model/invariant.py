"""Batch-invariant mode (``runtime.batch_invariant``): a token's numbers do not depend on what
else shares its step.

A row of a batched op is bitwise reproducible only if the op reduces each row in an order
that does not depend on the number of rows. On CPU ranks, measured on this project's
machines (``tests/unit/test_invariant.py`` checks it wherever the suite runs):

- float32 GEMMs (MKL ``sgemm``) take one path for 1 row, another for 2-3 rows and a third,
  row-independent, from 4 rows on; the oneDNN-packed float32 linear (``CPUPackedLinear``,
  the default on CPU ranks) pads to 16 rows already; bfloat16 GEMMs (oneDNN) are
  row-independent from 1 row. So every linear pads its rows to at least ``MIN_ROWS``
  (``linear``).
- a row reduction over a long row (an RMSNorm of a wide hidden state) is split across intra-op
  threads when the output has a single element: norms pad their rows as linears do.
- attention: every query goes through the paged C++ kernel (``model/cpu_attention.py``),
  whose result for a query depends only on its position's keys and values (scores, softmax
  over exactly its visible keys, values accumulated key by key) - not the SDPA prefill
  path, whose blocking follows the step's longest prompt, nor cascade attention, whose split
  follows what the step's sequences share.
- the TP all-reduce of more than two ranks is an all-gather and a sum in rank order (a sum
  of two is the same in either order).

The switch is process-wide, like ``torch.use_deterministic_algorithms``: the model runner
sets it from the engine's config when it builds and before every step (engines in one
process may differ).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_ROWS = 16  # rows every GEMM and norm runs on in batch-invariant mode

_enabled = False


def enable(on: bool) -> None:
    """Turns batch-invariant mode on or off for this process."""
    global _enabled
    _enabled = bool(on)


def check_device(device: torch.device) -> None:
    """One-line error unless this rank can run the mode: CPU ranks with the paged-attention
    extension (a GPU's GEMMs pick split-K and tiles by the row count)."""
    from seesaw_mcore.errors import SeesawError
    from seesaw_mcore.model import cpu_attention

    if device.type != "cpu":
        raise SeesawError(f"runtime.batch_invariant runs on CPU ranks only for now (this rank "
                          f"runs on {device.type}, whose GEMMs' reduction order follows the "
                          "row count)")
    if not cpu_attention.available():
        raise SeesawError("runtime.batch_invariant needs the CPU paged-attention extension, "
                          "which could not be built here (a C++ compiler)")


def enabled() -> bool:
    """Whether batch-invariant mode is on."""
    return _enabled


def pad_rows(x: torch.Tensor) -> torch.Tensor:
    """``[m, ...]`` -> ``[max(m, MIN_ROWS), ...]`` with zero rows after ``x``'s (``x`` itself
    when it has enough rows or the mode is off)."""
    m = x.shape[0]
    if not _enabled or m >= MIN_ROWS:
        return x
    return torch.cat([x, x.new_zeros(MIN_ROWS - m, *x.shape[1:])])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``F.linear`` of ``x`` ``[m, in]`` -> ``[m, out]``, on at least ``MIN_ROWS`` rows in
    batch-invariant mode."""
    m = x.shape[0]
    return F.linear(pad_rows(x), weight, bias)[:m]


def ordered_sum(x: torch.Tensor, group, size: int) -> torch.Tensor:
    """``x`` summed over ``group`` in rank order (an all-gather, then one add after another),
    written into ``x``."""
    import torch.distributed as dist

    wire = x.contiguous()
    if wire.element_size() == 2 and dist.get_backend(group) == "gloo":
        wire = wire.view(torch.int16)  # gloo gathers no bfloat16 / float16: the same bits
    parts = [torch.empty_like(wire) for _ in range(size)]
    dist.all_gather(parts, wire, group=group)
    parts = [p.view(x.dtype) for p in parts]
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    x.copy_(total)
    return x
