"""LoRA adapters in the forward: every loaded adapter's A and B cut for one stage under one
layout, stacked by adapter index, and a step's rows grouped by adapter.

Each of a layer's four linears (``qkv``, ``o_proj``, ``gate_up``, ``down``) gets, for
adapter index ``a``, ``A[a - 1]`` ``[R, in]`` and ``B[a - 1]`` ``[out, R]`` with
``R = sub-targets x max_lora_rank``: a fused linear stacks its targets' A rows
(q, k, v) and puts their B blocks on the diagonal, zero where a target or rank is absent,
PEFT's scale folded into B. Tensor parallelism cuts them as the base weights are cut: a
column-parallel linear's B keeps this rank's output rows, a row-parallel linear's A keeps
this rank's input columns, and its ``x_local A_local^T B^T`` is added to the partial sum
before the TP all-reduce, which completes it. Per step and layer, each adapter's rows run
one ``(x A^T) B^T`` (rows gathered, results added back): no loop over requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from seesaw_mcore.config import ModelConfig, split_layers
from seesaw_mcore.model.hf_names import part
from seesaw_mcore.model.lora import LoRAAdapter
from seesaw_mcore.model.params import ShardSpec

# our linear -> the PEFT target modules it fuses, in its output-row order
LINEARS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
           "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
ROW_PARALLEL = ("o_proj", "down")


@dataclass(frozen=True)
class StageLoRA:
    """The adapters of one stage: ``(local layer, linear) -> (A [N, R, in], B [N, out, R])``
    for adapter indices ``1..N`` (a linear no adapter targets has no entry)."""

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def stage_lora(adapters: dict[int, LoRAAdapter], cfg: ModelConfig, spec: ShardSpec,
               max_loras: int, max_rank: int, dtype: torch.dtype, device: torch.device
               ) -> StageLoRA:
    """Cuts ``adapters`` (index -> adapter, indices ``1..max_loras``) for ``spec``'s
    stage."""
    t, r = spec.tp, spec.tp_rank
    d = cfg.head_dim
    cuts = {"q_proj": part(cfg.num_heads * d, t, r), "k_proj": part(cfg.num_kv_heads * d, t, r),
            "o_proj": part(cfg.num_heads * d, t, r),
            "gate_proj": part(cfg.intermediate_size, t, r)}
    cuts |= {"v_proj": cuts["k_proj"], "up_proj": cuts["gate_proj"],
             "down_proj": cuts["gate_proj"]}
    start, end = split_layers(cfg.num_layers, spec.pp)[spec.pp_rank]
    out: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for j, layer in enumerate(range(start, end)):
        for linear, targets in LINEARS.items():
            used = [(i, a) for i, a in adapters.items()
                    if any((layer, m) in a.weights for m in targets)]
            if not used:
                continue
            row_parallel = linear in ROW_PARALLEL
            sizes = [cuts[m][1] - cuts[m][0] for m in targets]  # local out rows per target
            out_rows = cfg.hidden_size if row_parallel else sum(sizes)
            a_full, _ = next(a.weights[(layer, m)] for _, a in used for m in targets
                             if (layer, m) in a.weights)
            inp = cuts[targets[0]][1] - cuts[targets[0]][0] if row_parallel else a_full.shape[1]
            big_r = len(targets) * max_rank
            a_all = torch.zeros(max_loras, big_r, inp)  # [N, R, in]
            b_all = torch.zeros(max_loras, out_rows, big_r)  # [N, out, R]
            for index, adapter in used:
                row = 0
                for k, m in enumerate(targets):
                    if (layer, m) in adapter.weights:
                        a, b = adapter.weights[(layer, m)]  # [r, in], [out, r] full
                        s, e = cuts[m]
                        a = a[:, s:e] if row_parallel else a
                        b = b if row_parallel else b[s:e]
                        n, rank = b.shape[0], adapter.rank
                        a_all[index - 1, k * max_rank:k * max_rank + rank] = a
                        b_all[index - 1, row:row + n, k * max_rank:k * max_rank + rank] = \
                            b * adapter.scale
                    row += sizes[k]
            out[(j, linear)] = (a_all.to(device, dtype), b_all.to(device, dtype))
    return StageLoRA(out)


@dataclass(frozen=True)
class Padded:
    """Every adapter's rows at once, padded to the largest group: the batch's rows
    ``gather`` ``[G * m]`` (padding repeats a row), the adapters ``adapters`` ``[G]``
    (indices - 1), and which padded places are real (``real`` ``[n]``) with their batch
    rows (``rows`` ``[n]``)."""

    m: int
    gather: torch.Tensor
    adapters: torch.Tensor
    real: torch.Tensor
    rows: torch.Tensor


@dataclass(frozen=True)
class LoRABatch:
    """A micro-batch's rows by adapter: ``(index, rows [n] or None: every row)``, and
    (several adapters, little padding) the same rows padded for one batched matmul."""

    groups: tuple[tuple[int, torch.Tensor | None], ...]
    padded: Padded | None = None

    @classmethod
    def build(cls, indices: list[int], query_lens: list[int], device: torch.device
              ) -> "LoRABatch":
        """From each sequence's adapter index (0: the base model) and its fed tokens."""
        used = sorted(set(indices) - {0})
        if len(used) == 1 and 0 not in indices:
            return cls(((used[0], None),))
        rows = torch.repeat_interleave(torch.tensor(indices), torch.tensor(query_lens))  # [T]
        members = [torch.nonzero(rows == i).squeeze(1) for i in used]
        groups = tuple((i, r.to(device)) for i, r in zip(used, members))
        m = max(len(r) for r in members)
        if len(used) < PADDED_FROM or len(rows) > PADDED_MAX_ROWS or len(used) * m > 2 * len(rows):
            return cls(groups)
        gather = torch.stack([torch.cat([r, r[:1].expand(m - len(r))]) for r in members])
        real = torch.stack([torch.arange(m) < len(r) for r in members]).flatten()
        padded = Padded(m, gather.flatten().to(device), torch.tensor(used).sub(1).to(device),
                        torch.nonzero(real).squeeze(1).to(device),
                        torch.cat(members).to(device))
        return cls(groups, padded)


# One padded batched matmul for every adapter's rows pays where per-adapter op overhead
# dominates: three or more adapters in a micro-batch of at most 256 rows (decode-sized; CPU
# ranks, 2 threads: 1.4x faster at 4 adapters x 16 rows, 3.3x at 16 x 4; at 2,048 rows the
# per-adapter loop is faster, its gathers smaller).
PADDED_FROM, PADDED_MAX_ROWS = 3, 256


class ActiveLoRA:
    """What a stage's layers apply in one forward: the stage's adapters and the rows'."""

    def __init__(self, stage: StageLoRA, batch: LoRABatch) -> None:
        self.stage, self.batch = stage, batch

    def add(self, layer: int, linear: str, x: torch.Tensor, out: torch.Tensor,
            span: tuple[int, int] | None = None) -> None:
        """``out += x A^T B^T`` for each adapter's rows of local layer ``layer``'s
        ``linear`` (``x`` ``[T, in]``: its input, ``out`` ``[T, out]``: its output, or its
        TP partial sum for a row-parallel linear; ``span``: they are the batch's rows
        ``[start, end)`` only, a tile)."""
        got = self.stage.weights.get((layer, linear))
        if got is None:
            return
        a_all, b_all = got
        p = self.batch.padded
        if p is not None and span is None:  # one bmm pair for every adapter's rows
            xs = x.index_select(0, p.gather).view(len(p.adapters), p.m, -1)  # [G, m, in]
            a, b = a_all.index_select(0, p.adapters), b_all.index_select(0, p.adapters)
            delta = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2))
            out.index_add_(0, p.rows, delta.flatten(0, 1).index_select(0, p.real))
            return
        for index, rows in self.batch.groups:
            a, b = a_all[index - 1], b_all[index - 1]  # [R, in], [out, R]
            if rows is not None and span is not None:
                rows = rows[(rows >= span[0]) & (rows < span[1])] - span[0]
                if not len(rows):
                    continue
            if rows is None:
                out.addmm_(x @ a.T, b.T)
            else:
                out.index_add_(0, rows, (x.index_select(0, rows) @ a.T) @ b.T)
