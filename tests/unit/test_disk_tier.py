"""Disk KV tier: records written by PP-shaped parts read back by TP-shaped parts through
DeepSpeed AIO; owner-only file, gone once unlinked while still readable; page alignment;
clear errors for a bad path, no room, and AIO missing."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from seesaw_mcore.contract import DISK
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.kv import disk_tier
from seesaw_mcore.kv.disk_tier import DiskKVTier, check_disk_path, load_aio, page_tokens
from seesaw_mcore.kv.slots import SlotAllocator

L, H, D = 4, 2, 32  # layers, KV heads, head dim


@pytest.fixture(scope="module")
def aio():
    return load_aio()


@pytest.mark.parametrize("head_dim,dtype,page", [
    (32, torch.float32, 32), (128, torch.bfloat16, 16), (16, torch.float32, 64),
    (64, torch.float16, 32)])
def test_page_makes_head_runs_4k_aligned(head_dim, dtype, page):
    assert page_tokens(head_dim, dtype) == page
    assert page * head_dim * dtype.itemsize % 4096 == 0


def test_pp_parts_written_tp_parts_read(tmp_path, aio):
    path = str(tmp_path / "kv.bin")
    writer = DiskKVTier(path, 256, (L, H, D), torch.float32, create=True, aio=aio)
    reader = DiskKVTier(path, 256, (L, H, D), torch.float32, create=False, aio=aio)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    writer.unlink()  # both ranks hold it open: the name goes, the data stays
    assert os.listdir(tmp_path) == []
    slots = SlotAllocator(256, DISK, writer.page)
    first, second = slots.allocate(40), slots.allocate(5)
    assert (first.start, second.start) == (0, 64)  # records start on pages
    records = [first, second]
    data = [torch.randn(L, 2, H, writer.record_len(r), D) for r in records]  # [L, 2, H, R, D]
    for l0 in (0, 2):  # two PP stages: layers [0, 2) and [2, 4), every head
        parts = writer.staging(2, H, records)
        for part, record in zip(parts, data):
            part.copy_(record[l0:l0 + 2])
        writer.transfer(parts, records, l0, 0, write=True)
    for h0 in range(H):  # two TP ranks: every layer, one head
        parts = reader.staging(L, 1, records)
        reader.transfer(parts, records, 0, h0, write=False)
        for part, record, r in zip(parts, data, records):
            n = r.length
            assert torch.equal(part[..., :n, :], record[:, :, h0:h0 + 1, :n])
    writer.close()
    reader.close()


def test_missing_libaio_is_a_clear_error(monkeypatch):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    monkeypatch.setattr(AsyncIOBuilder, "is_compatible", lambda self, verbose=False: False)
    with pytest.raises(SeesawError) as e:
        disk_tier.load_aio()
    assert str(e.value) == (
        "cache.disk_path needs DeepSpeed AIO, which needs libaio (Debian/Ubuntu: apt-get "
        "install libaio-dev; RHEL: yum install libaio-devel); unset cache.disk_path to run "
        "without the disk tier")


def test_disk_path_errors(tmp_path):
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(SeesawError, match=f"^cache.disk_path '{f}' is not a directory$"):
        check_disk_path(str(f), 1)
    with pytest.raises(SeesawError, match=r"^disk KV tier needs 1048576.00 GiB but .* free; "
                                          r"lower cache.disk_kv_tokens or cache.disk_kv_gib$"):
        check_disk_path(str(tmp_path), 2**50)
    check_disk_path(str(tmp_path), 4096)
