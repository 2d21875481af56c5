"""The sections of ``EngineConfig`` (``config/engine.py``): the model (``ModelOptions``),
the KV cache and its tiers (``CacheConfig``), batching and the phase-switch policy
(``SchedulerConfig``), and the process-level settings (``RuntimeConfig``). Each validates
itself in ``__post_init__`` with one-line errors naming the field as the CLI spells it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from seesaw_mcore.config.families import family_names
from seesaw_mcore.config.model import ModelConfig
from seesaw_mcore.errors import SeesawError

MODEL_FORMATS = ("auto", "hf", "megatron")
DTYPES = ("auto", "float32", "bfloat16", "float16")
POLICIES = ("transition_minimizing", "prefill_first", "decode_first")


@dataclass
class ModelOptions:
    """Which checkpoint, and how long a sequence may get.

    Attributes:
        path: local HF model folder (safetensors), or a Megatron checkpoint (a
            ``torch_dist`` iteration folder or the save root naming its latest); never
            downloaded.
        format: ``"auto"`` (Megatron when ``path`` is a Megatron checkpoint), ``"hf"`` or
            ``"megatron"``.
        hf_config_path: an HF ``config.json`` (or the folder holding it) describing the
            model; for a Megatron checkpoint, instead of the training arguments it saved.
        max_model_len: longest prompt + output; ``None``: the model's context.
        tokenizer: a local tokenizer folder; ``None``: the model's (a Megatron
            checkpoint has none: give one, or an ``hf_config_path`` folder holding one).
        trust_remote_code: accepted for vLLM compatibility; ``True`` is refused (the engine
            runs its own implementation of the supported architectures and never runs code
            from a model folder).
    """

    path: str = ""
    format: str = "auto"
    hf_config_path: str | None = None
    max_model_len: int | None = None
    tokenizer: str | None = None
    trust_remote_code: bool = False

    def open(self) -> ModelConfig:
        """The model's architecture facts (``ModelConfig.open``)."""
        return ModelConfig.open(self.path, self.format, self.hf_config_path, self.tokenizer)

    def tokenizer_path(self) -> str:
        """Where the tokenizer (and ``generation_config.json``) are looked for."""
        if self.tokenizer:
            return self.tokenizer
        if self.hf_config_path and not self.hf_config_path.endswith(".json"):
            return self.hf_config_path
        return self.path

    def __post_init__(self) -> None:
        if self.format not in MODEL_FORMATS:
            raise SeesawError(f"model.format must be one of {', '.join(MODEL_FORMATS)}, "
                              f"got {self.format!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise SeesawError(f"model.max_model_len must be >= 2, got {self.max_model_len}")
        if self.trust_remote_code:
            raise SeesawError(
                "trust_remote_code=True is not supported: seesaw_mcore runs "
                f"{family_names()} checkpoints with its own megatron-core "
                "model and never runs code from a model folder")


CPU_KV_CACHE_GIB = 1.0  # CPU ranks' KV budget per rank when none is given


@dataclass
class CacheConfig:
    """Device KV cache.

    Attributes:
        block_size: tokens per KV block.
        num_blocks: blocks per rank; ``None``: from ``kv_cache_gib``, else on GPUs what
            a profiling run leaves free under ``gpu_memory_utilization``.
        kv_cache_gib: KV budget per rank when ``num_blocks`` is unset; ``None``: 1 GiB on
            CPU ranks, profiled on GPUs (vLLM's ``kv_cache_memory_bytes``, in GiB).
        gpu_memory_utilization: fraction of the GPU's memory the engine may use: weights,
            peak activations, communicators and the KV cache (GPU ranks, vLLM's meaning).
        host_kv_tokens: token slots of the host KV tier (Seesaw plans); ``None``: from
            ``host_kv_gib``.
        host_kv_gib: size of the host KV tier (one shared buffer per node) when
            ``host_kv_tokens`` is unset.
        prefetch_watermark: fraction of device blocks that admitting a sequence from a
            tier must leave free (room for running sequences to grow).
        disk_path: a directory for the disk KV tier (DeepSpeed AIO), used when the host
            tier is full; ``None``: no disk tier.
        disk_kv_tokens: token slots of the disk tier; ``None``: from ``disk_kv_gib``.
        disk_kv_gib: size of the disk tier (one file per node) when ``disk_kv_tokens`` is
            unset.
        async_swap: tier copies run on a background thread, overlapping compute.
        enable_prefix_caching: automatic prefix caching (vLLM's): full KV blocks are found
            by a chain hash of their tokens and shared by every sequence with that prefix;
            a prompt computes only what no cached block holds.
    """

    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float = 0.9
    host_kv_tokens: int | None = None
    host_kv_gib: float = 1.0
    prefetch_watermark: float = 0.01
    disk_path: str | None = None
    disk_kv_tokens: int | None = None
    disk_kv_gib: float = 8.0
    async_swap: bool = True
    enable_prefix_caching: bool = True

    def kv_cache_bytes(self, on_cpu: bool) -> float | None:
        """The KV budget per rank in bytes: ``kv_cache_gib``'s, else 1 GiB on CPU ranks;
        ``None``: profiled (GPU ranks)."""
        if self.kv_cache_gib is not None:
            return self.kv_cache_gib * 2**30
        return CPU_KV_CACHE_GIB * 2**30 if on_cpu else None

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise SeesawError(f"cache.block_size must be >= 1, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise SeesawError(f"cache.num_blocks must be >= 1, got {self.num_blocks}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise SeesawError(f"cache.gpu_memory_utilization must be in (0, 1], got "
                              f"{self.gpu_memory_utilization}")
        if self.kv_cache_gib is not None and self.kv_cache_gib <= 0:
            raise SeesawError(f"cache.kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.host_kv_tokens is not None and self.host_kv_tokens < 1:
            raise SeesawError(f"cache.host_kv_tokens must be >= 1, got {self.host_kv_tokens}")
        if self.host_kv_gib <= 0:
            raise SeesawError(f"cache.host_kv_gib must be > 0, got {self.host_kv_gib}")
        if not 0 <= self.prefetch_watermark < 1:
            raise SeesawError(
                f"cache.prefetch_watermark must be in [0, 1), got {self.prefetch_watermark}")
        if self.disk_kv_tokens is not None and self.disk_kv_tokens < 1:
            raise SeesawError(f"cache.disk_kv_tokens must be >= 1, got {self.disk_kv_tokens}")
        for name in ("async_swap", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise SeesawError(f"cache.{name} must be true or false, got "
                                  f"{getattr(self, name)!r}")
        if self.disk_kv_gib <= 0:
            raise SeesawError(f"cache.disk_kv_gib must be > 0, got {self.disk_kv_gib}")


@dataclass
class SchedulerConfig:
    """Batching budgets.

    Attributes:
        max_num_seqs: most sequences in one step.
        max_prefill_tokens: most prompt tokens in one prefill step (a longer single prompt
            still runs, alone).
        prefill_micro_batches: micro-batches per pipeline stage in a prefill step (PP > 1).
            More shrink the pipeline bubble (efficiency m / (m + PP - 1) for m micro-batches);
            decode always uses PP micro-batches, so each stage reads its weights PP times.
        policy: when a re-sharding plan switches decode -> prefill (prefill -> decode is
            always: when no tier can take the next prompt, or nothing waits).
            ``transition_minimizing`` (the paper's): once the KV tiers have drained below
            ``refill_threshold`` and prompts wait. ``prefill_first``: as soon as a waiting
            prompt fits the tiers (many switches, small decode batches). ``decode_first``:
            only once nothing is left to decode.
        refill_threshold: with ``transition_minimizing``, the fraction of the tiers' token
            slots still holding KV under which decode hands back to prefill. Sequences still
            decoding then have their KV swapped out to a tier, to resume after the prefill
            phase.
        max_wait_s: with requests arriving over time (``AsyncLLM``), the longest a prompt
            waits for a re-sharding plan's prefill phase: past it, decode hands back to
            prefill even above ``refill_threshold`` (if the sequences on the device fit the
            tiers). ``None``: no bound (pure throughput).
    """

    max_num_seqs: int = 256
    max_prefill_tokens: int = 4096
    prefill_micro_batches: int = 4
    policy: str = "transition_minimizing"
    refill_threshold: float = 0.2
    max_wait_s: float | None = None

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise SeesawError(f"scheduler.max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_prefill_tokens < 1:
            raise SeesawError(
                f"scheduler.max_prefill_tokens must be >= 1, got {self.max_prefill_tokens}")
        if self.prefill_micro_batches < 1:
            raise SeesawError(f"scheduler.prefill_micro_batches must be >= 1, got "
                              f"{self.prefill_micro_batches}")
        if self.policy not in POLICIES:
            raise SeesawError(f"scheduler.policy must be one of {', '.join(POLICIES)}, got "
                              f"{self.policy!r}")
        if not 0 <= self.refill_threshold <= 1:
            raise SeesawError(f"scheduler.refill_threshold must be in [0, 1], got "
                              f"{self.refill_threshold}")
        if self.max_wait_s is not None and not self.max_wait_s >= 0:
            raise SeesawError(f"scheduler.max_wait_s must be >= 0 or null, got "
                              f"{self.max_wait_s}")


@dataclass
class RuntimeConfig:
    """How the ranks run.

    Attributes:
        dist_timeout_s: collective timeout; a rank that dies makes the others fail after
            this (the watchdog usually names it much sooner).
        verbose: show third-party output (DeepSpeed, megatron-core, compiler lines) that a
            run hides by default.
        enforce_eager: no CUDA graphs (vLLM's meaning); by default GPU decode steps replay
            per-batch-size graphs (``runtime/cuda_graphs.py``).
        batch_invariant: a request's tokens and logprobs are bitwise the same whatever else
            shares its steps and whether its prefix came from the cache (fixed reduction
            orders, ``model/invariant.py``; CPU ranks).
    """

    dist_timeout_s: float = 300.0
    verbose: bool = False
    enforce_eager: bool = False
    batch_invariant: bool = False

    def __post_init__(self) -> None:
        if self.dist_timeout_s <= 0:
            raise SeesawError(f"runtime.dist_timeout_s must be > 0, got {self.dist_timeout_s}")
        for name in ("verbose", "enforce_eager", "batch_invariant"):
            if not isinstance(getattr(self, name), bool):
                raise SeesawError(f"runtime.{name} must be true or false, got "
                                  f"{getattr(self, name)!r}")


@dataclass
class LoRAConfig:
    """LoRA adapters (vLLM's names).

    Attributes:
        enable_lora: requests may run under PEFT LoRA adapters (``lora_request=``).
        max_loras: adapters held at once (each costs its A and B per layer and linear).
        max_lora_rank: the largest adapter rank accepted (the stacked tensors' width).
        path: the launchers' adapter folder for every request (``lora.path=``; a row's own
            ``lora_path`` field overrides it); implies ``enable_lora``.
        name: the adapter's name (default: the folder's name).
    """

    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    path: str | None = None
    name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.enable_lora, bool):
            raise SeesawError(f"enable_lora must be true or false, got {self.enable_lora!r}")
        for name in ("max_loras", "max_lora_rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SeesawError(f"{name} must be an integer >= 1, got {value!r}")
        if self.path:
            self.enable_lora = True


def resolve_path(path: str, repo: str) -> str:
    """A launcher's relative path: against the working directory, else against ``repo``
    (the bundled models and data), else as given."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    in_repo = os.path.join(repo, path)
    return in_repo if os.path.exists(in_repo) else path


def resolve_model_paths(model: dict, repo: str) -> None:
    """A launcher's ``model`` mapping: ``path``, ``tokenizer`` and ``hf_config_path``
    through ``resolve_path``."""
    for key in ("path", "tokenizer", "hf_config_path"):
        if model.get(key):
            model[key] = resolve_path(model[key], repo)
