"""Configuration: parallel layouts and plans (``parallel``), the model's facts (``model``) and
the engine's whole configuration (``engine``, its ``sections``). Pure dataclasses, validated
on construction."""

from seesaw_mcore.config.engine import EngineConfig
from seesaw_mcore.config.model import SUPPORTED_ARCHITECTURES, ModelConfig
from seesaw_mcore.config.parallel import (
    ParallelConfig,
    PhasePlan,
    check_world,
    kv_bytes_per_token,
    layout_error,
    padded_vocab_size,
    split_layers,
)
from seesaw_mcore.config.sections import (
    DTYPES,
    POLICIES,
    CacheConfig,
    ModelOptions,
    RuntimeConfig,
    SchedulerConfig,
)

__all__ = ["DTYPES", "POLICIES", "SUPPORTED_ARCHITECTURES", "CacheConfig", "EngineConfig",
           "ModelConfig", "ModelOptions", "ParallelConfig", "PhasePlan", "RuntimeConfig",
           "SchedulerConfig", "check_world", "kv_bytes_per_token", "layout_error",
           "padded_vocab_size", "split_layers"]
