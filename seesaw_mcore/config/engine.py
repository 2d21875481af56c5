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

from seesaw_mcore.config.parallel import PhasePlan
from seesaw_mcore.config.sections import (
    DTYPES,
    CacheConfig,
    LoRAConfig,
    ModelOptions,
    RuntimeConfig,
    SchedulerConfig,
)
from seesaw_mcore.contract import LOGPROBS_MODES, RunOptions
from seesaw_mcore.errors import SeesawError


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
        logprobs_mode: what returned logprobs (sampled, top-k and prompt) are of, vLLM's
            values: ``raw_logprobs`` (the model's distribution), ``raw_logits``,
            ``processed_logprobs`` (the distribution sampled from: after penalties,
            temperature, top-k / top-p / min-p), ``processed_logits``.
        enable_return_routed_experts: every completion returns the top-k expert ids each
            MoE layer chose for each of its tokens (router replay), as vLLM.
        cache: device KV cache and the host / disk tiers.
        scheduler: batching budgets and the phase-switch policy.
        runtime: timeouts and verbosity.
        lora: LoRA adapters (``enable_lora``, ``max_loras``, ``max_lora_rank``).
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
    logprobs_mode: str = "raw_logprobs"
    enable_return_routed_experts: bool = False
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        if not self.model.path:
            raise SeesawError("model.path is required (a local HF model folder or a Megatron "
                              "checkpoint)")
        if self.dtype not in DTYPES:
            raise SeesawError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.plan != "auto":
            self.plan = PhasePlan.from_string(self.plan).to_string()
        if not isinstance(self.enable_return_routed_experts, bool):
            raise SeesawError(f"enable_return_routed_experts must be true or false, got "
                              f"{self.enable_return_routed_experts!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise SeesawError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got "
                              f"{self.logprobs_mode!r}")
        for name in ("auto_candidates", "auto_trial_steps", "auto_trial_seqs"):
            if getattr(self, name) < 1:
                raise SeesawError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def is_auto(self) -> bool:
        return self.plan == "auto"

    def run_options(self) -> RunOptions:
        """What every rank's model runner applies to every step."""
        lora = self.lora
        return RunOptions(self.logprobs_mode, self.enable_return_routed_experts,
                          self.runtime.batch_invariant,
                          lora.max_loras if lora.enable_lora else 0, lora.max_lora_rank)

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
                                               "scheduler": {}, "runtime": {}, "lora": {}}
        top: dict[str, Any] = {}
        owner = {f.name: name for name, sect in _SECTIONS.items() for f in fields(sect)
                 if (name, f.name) not in (("lora", "path"), ("lora", "name"))}
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
             "runtime": RuntimeConfig, "lora": LoRAConfig}
