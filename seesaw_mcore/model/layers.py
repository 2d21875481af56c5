"""Building blocks: RMSNorm, rotary embedding, and inference forwards for megatron-core's
tensor-parallel linears with a CPU-fast TP all-reduce.

The parameters and their partitioning come from megatron-core's ``ColumnParallelLinear`` /
``RowParallelLinear``; only the forward is replaced, because inference needs no autograd
functions and the row-parallel all-reduce must be able to use DeepSpeed's shared-memory
``inference_all_reduce`` on CPU ranks (gloo costs ~50x more per call there).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seesaw_mcore import env
from seesaw_mcore.mcore import tensor_parallel
from seesaw_mcore.model import invariant


def _fast_all_reduce_allowed(group) -> bool:
    """DeepSpeed's shm all-reduce ignores its ``group``: use it only when the group is the
    whole world, the world is one node, and the backend is CPU/gloo."""
    if env.shm_allreduce_disabled():
        return False
    if dist.get_backend(group) != "gloo":
        return False
    world = dist.get_world_size()
    return dist.get_world_size(group) == world and env.local_world_size() == world


class TPAllReduce:
    """Sums a tensor across one TP group, in place, by the cheapest valid route."""

    def __init__(self, group) -> None:
        self.group = group
        self.size = dist.get_world_size(group) if group is not None else 1
        self.fast = self.size > 1 and _fast_all_reduce_allowed(group)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        if self.size > 2 and invariant.enabled():
            return invariant.ordered_sum(x, self.group, self.size)
        if self.fast:
            import deepspeed.comm as ds_comm

            ds_comm.inference_all_reduce(x)
        else:
            dist.all_reduce(x, group=self.group)
        return x


class CPUPackedLinear:
    """Float32 weights on CPU ranks run through oneDNN with the weight packed once
    (``mkldnn._reorder_linear_weight``): 2.2-2.7x ``F.linear`` on this project's AMD machines,
    where MKL's sgemm takes its AVX2 path (bf16 ``F.linear`` already uses oneDNN).
    ``SEESAW_CPU_PACKED_LINEAR=0`` turns it off.

    oneDNN keeps a kernel per distinct input shape (~0.5 MB each per weight shape, measured),
    so inputs are cut into tiles of at most :data:`PACKED_TILE_ROWS` rows and each tile's rows
    are padded to one of ~17 buckets: memory stays flat whatever the prefill sizes (tiling
    costs nothing measurable at 256 rows: 2,048 x 576 -> 3,072 in 44 ms tiled, 46 ms whole).
    """

    packed: torch.Tensor | None = None

    def pack_for_cpu(self) -> None:
        """Packs the current weight (call again whenever the weight tensor changes)."""
        w = self.weight
        ok = (w.device.type == "cpu" and w.dtype == torch.float32
              and torch.backends.mkldnn.is_available()
              and env.cpu_packed_linear())
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, None) if ok else None

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.packed is None:
            return invariant.linear(x, self.weight, bias)
        m = x.shape[0]
        if m <= PACKED_TILE_ROWS:
            return self._packed_tile(x, bias)
        out = x.new_empty(m, self.weight.shape[0])  # [m, out]
        for s in range(0, m, PACKED_TILE_ROWS):  # each tile copied while still in cache
            out[s:s + PACKED_TILE_ROWS] = self._packed_tile(x[s:s + PACKED_TILE_ROWS], bias)
        return out

    def _packed_tile(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        m = x.shape[0]
        pad = _row_bucket(m) - m
        out = torch.ops.mkldnn._linear_pointwise(
            F.pad(x, (0, 0, 0, pad)) if pad else x, self.packed, bias, "none", [], "")
        return out[:m] if pad else out  # [m, out]


PACKED_TILE_ROWS = 256


def _row_bucket(m: int) -> int:
    """``m`` rounded up to 16, then to 4 steps per power of two (17 buckets up to 256)."""
    if m <= 16:
        return 16
    step = 1 << (m.bit_length() - 3)
    return -(-m // step) * step


class ColumnLinear(CPUPackedLinear, tensor_parallel.ColumnParallelLinear):
    """``ColumnParallelLinear`` with a plain inference forward: ``[T, in] -> [T, out/TP]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self._linear(x, self.bias)


class RowLinear(CPUPackedLinear, tensor_parallel.RowParallelLinear):
    """``RowParallelLinear`` with an inference forward: ``[T, in/TP] -> [T, out]``, summed
    over TP."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reduce = TPAllReduce(self.tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.finish(self._linear(x, None))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial product ``[T, out]``, before the TP sum and the bias."""
        return self._linear(x, None)

    def finish(self, partial: torch.Tensor) -> torch.Tensor:
        """Sums partial products over TP (in place) and adds the bias: ``[T, out]``."""
        out = self.reduce(partial)
        return out + self.bias if self.bias is not None else out


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalized in float32, scaled in the model dtype (as HF does)."""

    def __init__(self, hidden: int, eps: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden, dtype=dtype), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        dtype, m = x.dtype, x.shape[0]
        x32 = invariant.pad_rows(x).float()  # (batch-invariant mode: >= MIN_ROWS rows)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32[:m].to(dtype)


class Rotary(nn.Module):
    """RoPE tables from transformers' own rope-parameter functions (default, linear, llama3,
    yarn), so scaling matches HF exactly. The tables are computed once per process and device
    (``rope_tables``) and shared by every stage, so a Seesaw switch that rebuilds a stage
    neither recomputes them nor copies them to the device again."""

    def __init__(self, hf_config, head_dim: int, max_positions: int) -> None:
        super().__init__()
        self._args = (hf_config, head_dim, max_positions)
        cos, sin = rope_tables(*self._args, torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def place(self, device: torch.device) -> None:
        """Uses ``device``'s shared tables (made there once)."""
        self.cos, self.sin = rope_tables(*self._args, device)

    def at(self, positions: torch.Tensor, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` ``[T, 1, D]`` in ``dtype`` at ``positions`` ``[T]``: gathered and
        cast once per step, shared by every layer."""
        cos = self.cos[positions].unsqueeze(1).to(dtype)  # [T, 1, D]
        sin = self.sin[positions].unsqueeze(1).to(dtype)  # [T, 1, D]
        return cos, sin


def apply_rotary(q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates ``q`` ``[T, Hq, D]`` and ``k`` ``[T, Hkv, D]`` by ``Rotary.at``'s tables."""
    cos, sin = rope  # [T, 1, D] each
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


_ROPE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def rope_tables(hf_config, head_dim: int, max_positions: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[P, D]`` float32 for the config's rope parameters, cached per device."""
    rope = hf_config.rope_parameters or {}
    key = (repr(sorted(rope.items())), head_dim, max_positions, str(device))
    if key not in _ROPE:
        cpu_key = (*key[:3], "cpu")
        if cpu_key not in _ROPE:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            rope_type = rope.get("rope_type", "default")
            if rope_type == "default":
                base = rope.get("rope_theta", 10000.0)
                inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2).float() / head_dim))
                scale = 1.0
            else:
                inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))
            pos = torch.arange(max_positions, dtype=torch.float32)
            freqs = torch.outer(pos, inv_freq.float())  # [P, D/2]
            emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
            _ROPE[cpu_key] = (emb.cos() * scale, emb.sin() * scale)
        cos, sin = _ROPE[cpu_key]
        _ROPE[key] = (cos.to(device), sin.to(device))
    return _ROPE[key]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
