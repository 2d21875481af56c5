"""Batch-invariant mode's building blocks on this machine's kernels (``model/invariant.py``):
a row's result does not depend on how many rows share the call - linears (float32 through
MKL and through oneDNN's packed path, bfloat16), the RMSNorm of a wide row, and the paged
attention kernel, whose result for a query does not depend on the other queries of the call
or on how its sequence's prompt was split into steps. With the mode off, a float32 linear's
row changes with the row count (what the mode fixes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seesaw_mcore.model import cpu_attention, invariant
from seesaw_mcore.model.layers import RMSNorm

ROWS = (1, 2, 3, 5, 16, 17, 64, 300)


@pytest.fixture()
def mode():
    invariant.enable(True)
    yield
    invariant.enable(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n", [(576, 576), (1536, 576), (64, 4096)])
def test_linear_rows_do_not_depend_on_the_row_count(mode, dtype, k, n):
    g = torch.Generator().manual_seed(k + n)
    w = torch.randn(n, k, generator=g).to(dtype)
    x = torch.randn(300, k, generator=g).to(dtype)
    ref = invariant.linear(x[:1], w)
    for m in ROWS:
        assert torch.equal(invariant.linear(x[:m], w)[:1], ref), m
    packed = torch.ops.mkldnn._reorder_linear_weight(w.float(), None)
    first = torch.ops.mkldnn._linear_pointwise(F.pad(x[:1].float(), (0, 0, 0, 15)), packed,
                                               None, "none", [], "")[:1]
    for m in (16, 17, 64, 256):
        got = torch.ops.mkldnn._linear_pointwise(x[:m].float(), packed, None, "none", [], "")
        assert torch.equal(got[:1], first), m


def test_without_the_mode_a_float32_row_changes_with_the_row_count():
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(576, 576, generator=g), torch.randn(64, 576, generator=g)
    assert not all(torch.equal(F.linear(x[:m], w)[:1], F.linear(x[:1], w)) for m in ROWS)


def test_rmsnorm_of_a_wide_row_does_not_depend_on_the_row_count(mode):
    norm = RMSNorm(49152, 1e-6)
    x = torch.randn(64, 49152, generator=torch.Generator().manual_seed(1))
    ref = norm(x[:1])
    for m in ROWS[:7]:
        assert torch.equal(norm(x[:m])[:1], ref), m


@pytest.mark.skipif(not cpu_attention.available(), reason="no C++ compiler")
def test_paged_attention_of_a_query_depends_on_its_keys_only():
    """A 40-token sequence's queries: all in one call with 3 other sequences, or as two
    chunks (32 cached + 8 new) alone: bitwise the same outputs."""
    g = torch.Generator().manual_seed(2)
    bs, hkv, hq, d, nb = 16, 2, 4, 64, 32
    kc = torch.randn(nb, bs, hkv, d, generator=g)
    vc = torch.randn(nb, bs, hkv, d, generator=g)

    def run(qs: list[torch.Tensor], ctx: list[int], tables: list[list[int]]) -> torch.Tensor:
        q = torch.cat(qs)
        cu = torch.tensor([0] + [len(x) for x in qs]).cumsum(0).int()
        width = max(map(len, tables))
        tab = torch.tensor([t + [0] * (width - len(t)) for t in tables]).int()
        return cpu_attention.paged_attention_cpu(q, kc, vc, tab, cu, torch.tensor(ctx).int())

    q = torch.randn(40, hq, d, generator=g)
    others = [torch.randn(n, hq, d, generator=g) for n in (7, 30, 1)]
    whole = run([others[0], q, others[1], others[2]], [7, 40, 30, 50],
                [[10], [0, 1, 2], [5, 6], [20, 21, 22, 23]])[7:47]
    tail = run([q[32:]], [40], [[0, 1, 2]])
    head = run([q[:32]], [32], [[0, 1]])
    assert torch.equal(torch.cat([head, tail]), whole)
