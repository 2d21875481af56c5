"""seesaw_mcore: offline LLM inference with dynamic re-sharding on megatron-core + DeepSpeed."""

from seesaw_mcore import quiet
from seesaw_mcore.config import EngineConfig
from seesaw_mcore.engine.request import CompletionOutput, RequestOutput
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.sampling_params import RequestOutputKind, SamplingParams

quiet.install_filters()


def __getattr__(name: str):  # LLM pulls in torch/megatron: import it lazily
    if name == "LLM":
        from seesaw_mcore.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from seesaw_mcore.async_llm import AsyncLLM

        return AsyncLLM
    if name == "LoRARequest":
        from seesaw_mcore.model.lora import LoRARequest

        return LoRARequest
    raise AttributeError(name)


__all__ = ["LLM", "AsyncLLM", "EngineConfig", "SamplingParams", "RequestOutputKind",
           "RequestOutput", "CompletionOutput", "SeesawError", "LoRARequest"]
