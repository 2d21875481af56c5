"""oneDNN-packed float32 linears on CPU ranks: the same numbers as ``F.linear`` for every row
count (tiles, padded buckets, bias), a bounded set of kernel shapes, and the off switch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seesaw_mcore.model.layers import PACKED_TILE_ROWS, CPUPackedLinear, _row_bucket

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="no oneDNN in this torch build")


class _Linear(CPUPackedLinear):
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight


@pytest.mark.parametrize("rows", [1, 7, 16, 17, 100, 256, 257, 700])
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_matches_f_linear(rows, with_bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(48, 40, generator=g)
    b = torch.randn(48, generator=g) if with_bias else None
    x = torch.randn(rows, 40, generator=g)
    lin = _Linear(w)
    lin.pack_for_cpu()
    assert lin.packed is not None
    got = lin._linear(x, b)
    assert got.shape == (rows, 48)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_row_buckets_are_few_and_pad_little():
    buckets = {_row_bucket(m) for m in range(1, PACKED_TILE_ROWS + 1)}
    assert len(buckets) == 17 and max(buckets) == PACKED_TILE_ROWS
    for m in range(17, PACKED_TILE_ROWS + 1):
        assert m <= _row_bucket(m) <= m * 1.25


def test_off_switch_and_other_dtypes_use_f_linear(monkeypatch):
    lin = _Linear(torch.randn(8, 8))
    monkeypatch.setenv("SEESAW_CPU_PACKED_LINEAR", "0")
    lin.pack_for_cpu()
    assert lin.packed is None
    monkeypatch.delenv("SEESAW_CPU_PACKED_LINEAR")
    half = _Linear(torch.randn(8, 8, dtype=torch.bfloat16))
    half.pack_for_cpu()
    assert half.packed is None  # bf16 F.linear already goes through oneDNN
