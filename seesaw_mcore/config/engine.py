"""``EngineConfig``: everything an engine is built from, validated in one place.

Built from ``LLM(**kwargs)`` (``EngineConfig.from_kwargs``: flat keyword arguments, each the
name of one field of one section) and from Hydra (``launch/infer.py`` registers a structured
config whose engine part is this dataclass, so Hydra type-checks overrides such as
``cache.num_blocks=abc`` before the job starts). Each section validates itself in
``__post_init__`` with one-line errors naming the field as the CLI spells it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any

from seesaw_mcore.config.model import ModelConfig
from seesaw_mcore.config.parallel import PhasePlan
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
                "trust_remote_code=True is not supported: seesaw_mcore runs Llama, Qwen2, "
                "Qwen3 and Mistral checkpoints with its own megatron-core model and never "
                "runs code from a model folder")


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
    """

    max_num_seqs: int = 256
    max_prefill_tokens: int = 4096
    prefill_micro_batches: int = 4
    policy: str = "transition_minimizing"
    refill_threshold: float = 0.2

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
    """

    dist_timeout_s: float = 300.0
    verbose: bool = False
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.dist_timeout_s <= 0:
            raise SeesawError(f"runtime.dist_timeout_s must be > 0, got {self.dist_timeout_s}")


@dataclass
class EngineConfig:
    """One engine's whole configuration.

    Attributes:
        model: the checkpoint and ``max_model_len``.
        plan: ``"T2"`` (static), ``"P2:T2"`` (prefill:decode, re-sharding between them) or
            ``"auto"`` (the planner's pick for this job's ranks and ``workload``).
        workload: ``plan="auto"``'s workload: a preset (``sharegpt``, ``arxiv``) or mean
            lengths ``"PROMPT:OUTPUT"`` (``"40:85"``).
        auto_trial: ``plan="auto"`` runs its top candidates for a few steps of the job's
            first requests and continues on the fastest (``planner/trial.py``); ``False``:
            the cost model's pick, untried.
        auto_candidates: candidates the trial runs.
        auto_trial_steps: decode steps the trial measures per candidate.
        auto_trial_seqs: sequences (the job's first) the trial runs on.
        dtype: ``auto`` (float32 on CPU ranks, the checkpoint's dtype on GPUs), ``float32``,
            ``bfloat16`` or ``float16``.
        seed: engine seed, for requests whose ``SamplingParams.seed`` is ``None``.
        cache: device KV cache and the host / disk tiers.
        scheduler: batching budgets and the phase-switch policy.
        runtime: timeouts and verbosity.
    """

    model: ModelOptions = field(default_factory=ModelOptions)
    plan: str = "T1"
    workload: str = "sharegpt"
    auto_trial: bool = True
    auto_candidates: int = 3
    auto_trial_steps: int = 8
    auto_trial_seqs: int = 16
    dtype: str = "auto"
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self) -> None:
        if not self.model.path:
            raise SeesawError("model.path is required (a local HF model folder or a Megatron "
                              "checkpoint)")
        if self.dtype not in DTYPES:
            raise SeesawError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.plan != "auto":
            self.plan = PhasePlan.from_string(self.plan).to_string()
        for name in ("auto_candidates", "auto_trial_steps", "auto_trial_seqs"):
            if getattr(self, name) < 1:
                raise SeesawError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def is_auto(self) -> bool:
        return self.plan == "auto"

    def phase_plan(self) -> PhasePlan:
        """The plan as layouts (not for ``plan="auto"``: resolve it first)."""
        if self.is_auto:
            raise SeesawError("plan=auto must be resolved by the planner first")
        return PhasePlan.from_string(self.plan)

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> "EngineConfig":
        """The config of ``LLM(model, **kwargs)``: each keyword is a field of one section
        (``block_size`` -> ``cache.block_size``) or a top-level field; ``prefill=`` /
        ``decode=`` spell the plan as two layouts. Unknown names: a one-line error naming
        the closest known one."""
        _vllm_names(kwargs)
        prefill, decode = kwargs.pop("prefill", None), kwargs.pop("decode", None)
        if prefill is not None or decode is not None:
            if "plan" in kwargs:
                raise SeesawError("give the plan either as plan= or as prefill=/decode=, "
                                  "not both")
            if prefill is None:
                raise SeesawError("decode= needs prefill= (or use plan='P2:T2')")
            kwargs["plan"] = prefill if decode in (None, prefill) or prefill == "auto" \
                else f"{prefill}:{decode}"
        sections: dict[str, dict[str, Any]] = {"model": {"path": str(model)}, "cache": {},
                                               "scheduler": {}, "runtime": {}}
        top: dict[str, Any] = {}
        owner = {f.name: name for name, sect in _SECTIONS.items() for f in fields(sect)}
        tops = {f.name for f in fields(cls)} - set(_SECTIONS)
        for key, value in kwargs.items():
            if key in tops:
                top[key] = value
            elif key in owner and key != "path":
                sections[owner[key]][key] = value
            else:
                known = sorted(tops | set(owner) | {"prefill", "decode"} | set(VLLM_NAMES))
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise SeesawError(f"LLM() got an unknown keyword argument {key!r}{hint}")
        return cls(**top, **{name: _SECTIONS[name](**vals) for name, vals in sections.items()})

    @classmethod
    def from_mapping(cls, raw: dict[str, Any]) -> "EngineConfig":
        """From a nested mapping shaped like this dataclass (Hydra's ``to_container``);
        keys that are not engine fields (``sampling``, ``data``...) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: (_SECTIONS[k](**v) if k in _SECTIONS else v)
                      for k, v in raw.items() if k in names})


# vLLM's LLM(...) names: a static plan's degrees, and aliases of our fields
PARALLEL_SIZES = {"data_parallel_size": "D", "tensor_parallel_size": "T",
                  "pipeline_parallel_size": "P"}
ALIASES = {"max_num_batched_tokens": "max_prefill_tokens"}
VLLM_NAMES = (*PARALLEL_SIZES, *ALIASES)


def _vllm_names(kwargs: dict[str, Any]) -> None:
    """Rewrites vLLM's keyword names in place: ``tensor_parallel_size=2`` (and pipeline /
    data) -> ``plan="T2"``; aliases -> our names. Two spellings of one thing are an error."""
    sizes = {k: kwargs.pop(k) for k in PARALLEL_SIZES if k in kwargs}
    if sizes:
        given = [k for k in ("plan", "prefill", "decode") if k in kwargs]
        if given:
            raise SeesawError(f"give the plan either as {given[0]}= or as "
                              f"{'/'.join(sizes)}, not both (a Seesaw plan needs plan=)")
        for k, v in sizes.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SeesawError(f"{k} must be an integer >= 1, got {v!r}")
        kwargs["plan"] = "".join(f"{PARALLEL_SIZES[k]}{sizes.get(k, 1)}" for k in PARALLEL_SIZES)
    for alias, name in ALIASES.items():
        if alias in kwargs:
            if name in kwargs:
                raise SeesawError(f"give either {alias}= or {name}=, not both")
            kwargs[name] = kwargs.pop(alias)


_SECTIONS = {"model": ModelOptions, "cache": CacheConfig, "scheduler": SchedulerConfig,
             "runtime": RuntimeConfig}
