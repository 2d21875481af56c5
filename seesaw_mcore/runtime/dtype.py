"""The engine's compute dtype: a config name resolved for this rank's device."""

from __future__ import annotations

import torch

from seesaw_mcore.config import DTYPES, ModelConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.runtime import groups

_DTYPES = {name: getattr(torch, name) for name in DTYPES if name != "auto"}  # config's names


def resolve_dtype(name: str, cfg: ModelConfig) -> torch.dtype:
    """``auto`` -> float32 on CPU ranks (fast, exact), the checkpoint's dtype on GPUs (float16
    where the GPU has no bfloat16). Half precision runs on CPU ranks too (half the memory).

    Raises:
        SeesawError: an unknown name, or a dtype this rank's device cannot compute in.
    """
    device = groups.device()
    acc = groups.accelerator()
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        dtype = _DTYPES.get(cfg.torch_dtype, torch.bfloat16)
        if dtype == torch.bfloat16 and not acc.is_bf16_supported():
            return torch.float16
        return dtype
    if name not in _DTYPES:
        raise SeesawError(f"dtype {name!r} is not one of auto, {', '.join(_DTYPES)}")
    dtype = _DTYPES[name]
    if device.type != "cpu":  # DeepSpeed's CPU accelerator under-reports; torch CPU has both
        ok = {torch.bfloat16: acc.is_bf16_supported, torch.float16: acc.is_fp16_supported}
        if dtype in ok and not ok[dtype]():
            raise SeesawError(f"dtype {name} is not supported on this rank's device "
                              f"({device}); use "
                              f"{'float16' if dtype == torch.bfloat16 else 'float32'}")
    return dtype
