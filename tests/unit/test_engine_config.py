"""EngineConfig: one config built from LLM keyword arguments and from Hydra, plan strings,
one-line errors naming the field (and the closest known keyword)."""

from __future__ import annotations

import os
import sys

import pytest

from seesaw_mcore.config import EngineConfig, PhasePlan
from seesaw_mcore.errors import SeesawError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_kwargs_reach_every_section():
    cfg = EngineConfig.from_kwargs("/m", plan="P2:T2", dtype="bfloat16", seed=3,
                                   max_model_len=64, block_size=8, gpu_memory_utilization=0.5,
                                   max_num_seqs=4, policy="decode_first", verbose=True)
    assert cfg.model.path == "/m" and cfg.model.max_model_len == 64
    assert (cfg.plan, cfg.dtype, cfg.seed) == ("P2:T2", "bfloat16", 3)
    assert cfg.cache.block_size == 8 and cfg.cache.gpu_memory_utilization == 0.5
    assert cfg.scheduler.max_num_seqs == 4 and cfg.scheduler.policy == "decode_first"
    assert cfg.runtime.verbose is True


def test_vllm_keyword_names():
    cfg = EngineConfig.from_kwargs(
        "/m", tensor_parallel_size=2, pipeline_parallel_size=2, gpu_memory_utilization=0.9,
        max_model_len=2048, max_num_seqs=64, max_num_batched_tokens=1024, seed=0,
        dtype="float32", tokenizer="/tok", enforce_eager=True, trust_remote_code=False)
    assert cfg.plan == "T2P2" and cfg.scheduler.max_prefill_tokens == 1024
    assert cfg.model.tokenizer == "/tok" and cfg.runtime.enforce_eager
    assert EngineConfig.from_kwargs("/m", data_parallel_size=2).plan == "D2"


@pytest.mark.parametrize("kwargs,plan", [
    ({"prefill": "P2", "decode": "T2"}, "P2:T2"),
    ({"prefill": "T2"}, "T2"),
    ({"prefill": "T2", "decode": "T2"}, "T2"),
    ({"plan": "p2_t2"}, "P2:T2"),
    ({"plan": "d2p2:D2T2"}, "D2P2:D2T2"),
    ({"plan": "T3"}, "T3"),
    ({"plan": "auto"}, "auto"),
    ({"prefill": "auto"}, "auto"),
])
def test_plan_spellings(kwargs, plan):
    assert EngineConfig.from_kwargs("/m", **kwargs).plan == plan


def test_plan_string_round_trip():
    for text in ("T1", "P2:T2", "D2T2P2:T8"):
        assert PhasePlan.from_string(text).to_string() == text
    assert str(PhasePlan.from_string("P2->T2")) == "P2 -> T2"


@pytest.mark.parametrize("kwargs,msg", [
    ({"xyzzy": 2}, "LLM() got an unknown keyword argument 'xyzzy'"),
    ({"tensor_paralel": 2}, "LLM() got an unknown keyword argument 'tensor_paralel'; did you "
                            "mean 'tensor_parallel_size'?"),
    ({"tensor_parallel_size": 2, "plan": "P2:T2"}, "give the plan either as plan= or as "
     "tensor_parallel_size, not both (a Seesaw plan needs plan=)"),
    ({"tensor_parallel_size": 0}, "tensor_parallel_size must be an integer >= 1, got 0"),
    ({"max_num_batched_tokens": 8, "max_prefill_tokens": 8}, "give either "
     "max_num_batched_tokens= or max_prefill_tokens=, not both"),
    ({"max_loras": 0}, "max_loras must be an integer >= 1, got 0"),
    ({"max_lora_rank": 2.5}, "max_lora_rank must be an integer >= 1, got 2.5"),
    ({"enable_lora": "yes"}, "enable_lora must be true or false, got 'yes'"),
    ({"trust_remote_code": True}, "trust_remote_code=True is not supported: seesaw_mcore runs "
     "Llama, Qwen2, Qwen3, Mistral, Qwen3-MoE and Mixtral checkpoints with its own megatron-core "
     "model and never runs code from a model folder"),
    ({"block_sise": 8}, "LLM() got an unknown keyword argument 'block_sise'; did you mean "
                        "'block_size'?"),
    ({"plan": "T2", "prefill": "P2"}, "give the plan either as plan= or as prefill=/decode=, "
                                      "not both"),
    ({"decode": "T2"}, "decode= needs prefill= (or use plan='P2:T2')"),
    ({"plan": "P2:T2:T4"}, "invalid plan 'P2:T2:T4': expected a layout ('T2') or "
                           "prefill:decode ('P2:T2')"),
    ({"plan": "X2"}, "invalid parallel layout 'X2': expected e.g. 'T2', 'P4', 'D2P2', 'T2P2'"),
    ({"plan": "P2:T4"}, "plan P2 -> T4: prefill uses 2 ranks but decode uses 4; both phases "
                        "run on the same ranks"),
    ({"dtype": "fp8"}, "dtype must be one of auto, float32, bfloat16, float16, got 'fp8'"),
    ({"max_model_len": 1}, "model.max_model_len must be >= 2, got 1"),
    ({"dist_timeout_s": 0}, "runtime.dist_timeout_s must be > 0, got 0"),
    ({"policy": "fifo"}, "scheduler.policy must be one of transition_minimizing, "
                         "prefill_first, decode_first, got 'fifo'"),
    ({"plan": "auto", "auto_candidates": 0}, "auto_candidates must be >= 1, got 0"),
    ({"auto_trial_steps": 0}, "auto_trial_steps must be >= 1, got 0"),
    ({"logprobs_mode": "processed"}, "logprobs_mode must be one of raw_logprobs, raw_logits, "
     "processed_logprobs, processed_logits, got 'processed'"),
    ({"batch_invariant": "yes"}, "runtime.batch_invariant must be true or false, got 'yes'"),
    ({"enable_return_routed_experts": 1},
     "enable_return_routed_experts must be true or false, got 1"),
    ({"enable_prefix_caching": "maybe"},
     "cache.enable_prefix_caching must be true or false, got 'maybe'"),
])
def test_errors(kwargs, msg):
    with pytest.raises(SeesawError) as e:
        EngineConfig.from_kwargs("/m", **kwargs)
    assert str(e.value) == msg


def test_model_path_required():
    with pytest.raises(SeesawError, match="^model.path is required"):
        EngineConfig()


@pytest.fixture(scope="module")
def compose():
    """Hydra's compose over conf/ with launch/infer.py's structured schema registered."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    sys.path.insert(0, os.path.join(REPO, "launch"))
    import infer  # noqa: F401 - registers InferConfig in Hydra's ConfigStore

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        yield lambda *overrides: hydra_compose("infer", overrides=list(overrides))
    GlobalHydra.instance().clear()


def test_hydra_builds_the_same_config(compose):
    from omegaconf import OmegaConf

    cfg = compose("plan=P2:T2", "cache.gpu_memory_utilization=0.5", "model.max_model_len=64",
                  "runtime.verbose=true", "scheduler.max_num_seqs=4")
    eng = EngineConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))
    assert eng == EngineConfig.from_kwargs(
        cfg.model.path, plan="P2:T2", gpu_memory_utilization=0.5, max_model_len=64,
        verbose=True, max_num_seqs=4)


def test_hydra_auto_trial_switch(compose):
    from omegaconf import OmegaConf

    cfg = compose("plan=auto", "workload=40:85", "auto_trial=false", "auto_candidates=2")
    eng = EngineConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))
    assert (eng.plan, eng.workload, eng.auto_trial, eng.auto_candidates) == (
        "auto", "40:85", False, 2)


def test_hydra_type_checks_overrides(compose):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        compose("cache.num_blocks=abc")
    assert "could not be converted to Integer" in str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException) as e:
        compose("cache.enable_prefix_caching=maybe")
    assert "Value 'maybe' is not a valid bool" in str(e.value.__cause__)
    with pytest.raises(ConfigCompositionException):
        compose("cache.no_such_field=1")


def test_prefix_caching_is_on_by_default_and_switchable(compose):
    from omegaconf import OmegaConf

    assert EngineConfig.from_kwargs("/m").cache.enable_prefix_caching is True
    cfg = compose("cache.enable_prefix_caching=false")
    eng = EngineConfig.from_mapping(OmegaConf.to_container(cfg, resolve=True))
    assert eng.cache.enable_prefix_caching is False
    assert not EngineConfig.from_kwargs("/m", enable_prefix_caching=False).cache \
        .enable_prefix_caching
