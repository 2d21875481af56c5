"""dtype resolution: names, ``auto`` per device, and a half type the device lacks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from seesaw_mcore.config import ModelConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.runtime import groups
from seesaw_mcore.runtime.dtype import resolve_dtype


class _Acc:
    def __init__(self, bf16: bool, fp16: bool = True) -> None:
        self.bf16, self.fp16 = bf16, fp16

    def is_bf16_supported(self) -> bool:
        return self.bf16

    def is_fp16_supported(self) -> bool:
        return self.fp16

    def device_name(self, index=None) -> str:
        return "cuda"


@pytest.fixture
def cfg() -> ModelConfig:
    return ModelConfig.from_pretrained("models/tiny-llama")


def test_cpu_names_and_auto(cfg):
    assert resolve_dtype("auto", cfg) == torch.float32  # CPU ranks: exact and fast
    assert resolve_dtype("bfloat16", cfg) == torch.bfloat16  # half precision runs on CPU too
    assert resolve_dtype("float16", cfg) == torch.float16
    with pytest.raises(SeesawError, match="dtype 'fp8' is not one of auto, float32, bfloat16, "
                                          "float16"):
        resolve_dtype("fp8", cfg)


def test_gpu_without_bf16(cfg, monkeypatch):
    monkeypatch.setattr(groups, "device", lambda: torch.device("cuda:0"))
    monkeypatch.setattr(groups, "accelerator", lambda: _Acc(bf16=False))
    with pytest.raises(SeesawError) as e:
        resolve_dtype("bfloat16", cfg)
    assert str(e.value) == ("dtype bfloat16 is not supported on this rank's device (cuda:0); "
                            "use float16")
    bf16_ckpt = dataclasses.replace(cfg, torch_dtype="bfloat16")
    assert resolve_dtype("auto", bf16_ckpt) == torch.float16  # auto falls back instead
    monkeypatch.setattr(groups, "accelerator", lambda: _Acc(bf16=True))
    assert resolve_dtype("auto", bf16_ckpt) == torch.bfloat16  # the checkpoint's dtype
    assert resolve_dtype("auto", cfg) == torch.float32
