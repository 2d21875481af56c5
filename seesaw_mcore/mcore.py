"""megatron-core, imported once for the whole package.

megatron-core decorates its training fusions (``bias_geglu``, ``bias_swiglu``, ...) with
``torch.compile`` when it is imported (``megatron.core.jit.jit_fuser``), and that decoration
alone imports TorchInductor: ~1.8 s of every rank's start-up on CPU ranks, for functions this
engine never calls (its stages have their own inference forwards). So the first import runs
with ``torch.compile`` standing in as a plain decorator; the fusions stay callable, eager.
Everything in the package imports megatron-core through this module.
"""

from __future__ import annotations

import sys

import torch


def _import_megatron_core() -> None:
    if "megatron.core" in sys.modules:  # imported already (e.g. by a training script)
        return
    compile_ = torch.compile

    def eager(model=None, **_kwargs):
        return model if model is not None else (lambda fn: fn)

    torch.compile = eager
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = compile_


_import_megatron_core()

from megatron.core import parallel_state, tensor_parallel  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402


def saved_arg_types() -> list[type]:
    """The enum classes megatron-core puts in the training arguments Megatron-LM saves."""
    from megatron.core import enums as core_enums
    from megatron.core.transformer import enums as tf_enums

    return [v for mod in (core_enums, tf_enums) for v in vars(mod).values()
            if isinstance(v, type) and v.__module__ == mod.__name__]


__all__ = ["parallel_state", "tensor_parallel", "ModelParallelConfig", "saved_arg_types"]
