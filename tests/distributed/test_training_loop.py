"""Inside a post-training loop, under T1, T2, P2, D2 and P2:T2 (one launch per world):

- ``LLM.update_weights``: an engine built on checkpoint A, given checkpoint B's full tensors,
  generates what HF generates on B (the Seesaw plan after several switches: both layouts'
  shards were written); partial updates compose; a bad name, shape or dtype is a one-line
  error and changes nothing; the same update from a separate trainer process over a
  weight-update group.
- Megatron checkpoints written by megatron-core's own ``dist_checkpointing.save`` at TP=2,
  PP=2 (layers stacked, training args saved) and TP=2 (one key per layer, tied embeddings,
  q/k/v biases, config from an HF folder) generate what HF generates from the same weights.
- ``sleep`` / ``wake_up``: the memory returned (RSS), the same outputs after waking, errors
  while asleep or before a level-2 sleep's weights are written again.
"""

from __future__ import annotations

import pytest

from seesaw_mcore.config import ModelConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model.megatron_checkpoint import MegatronCheckpoint
from tests.conftest import TINY, hf_greedy, launch_worlds
from tests.distributed.engine_job import MAX_TOKENS, PROMPTS

WORLDS = {1: ["T1"], 2: ["T2", "P2", "D2", "P2:T2"]}
PLANS = [p for plans in WORLDS.values() for p in plans]


@pytest.fixture(scope="module")
def megatron_root(megatron_checkpoints) -> str:
    return megatron_checkpoints


@pytest.fixture(scope="module")
def results(tiny_models, megatron_root, tmp_path_factory) -> dict:
    models = ",".join([tiny_models["llama"], tiny_models["llama_b"], tiny_models["qwen2"],
                       megatron_root, tiny_models["wide"], TINY])
    return launch_worlds("tests.distributed.training_loop_job", WORLDS, models,
                         tmp_path_factory, timeout=600)


@pytest.fixture(scope="module")
def hf(tiny_models) -> dict[str, list[list[int]]]:
    return {k: hf_greedy(tiny_models[k], PROMPTS, MAX_TOKENS)
            for k in ("llama", "llama_b", "qwen2")}


@pytest.mark.parametrize("plan", PLANS)
def test_updated_engine_generates_what_hf_generates_on_the_new_weights(results, hf, plan):
    r = results[plan]
    assert r["before"] == hf["llama"] and r["after"] == hf["llama_b"]
    assert r["after"] != r["before"]
    assert r["back_to_a"] == hf["llama"] and r["halves"] == hf["llama_b"]
    if plan == "P2:T2":
        assert r["switches"] >= 4  # the new weights came back through switches


@pytest.mark.parametrize("plan", ["T1", "P2:T2"])
def test_update_from_a_trainer_process_equals_the_in_process_one(results, hf, plan):
    """A separate trainer process broadcasts B's tensors over a group made for it
    (``init_weight_update_group`` + ``update_weights_from_distributed``)."""
    assert results[plan]["distributed"] == results[plan]["after"] == hf["llama_b"]


@pytest.mark.parametrize("plan", PLANS)
def test_bad_updates_are_refused_whole(results, hf, plan):
    r = results[plan]
    assert r["errors"] == [
        "update_weights: 'nope.weight' is not a parameter of this model",
        "update_weights: model.embed_tokens.weight has shape [1, 64] but the model's is "
        "[250, 64] (full, unsharded tensors)",
        "update_weights: model.norm.weight must be a floating-point tensor, got torch.int64",
    ]
    assert r["after_refused"] == hf["llama_b"]  # the valid first pair was not written either


@pytest.mark.parametrize("plan", PLANS)
def test_megatron_checkpoints_generate_what_hf_generates(results, hf, plan):
    """Saved at TP=2 PP=2 (read as a save root) and at TP=2 with per-layer keys, loaded
    into every plan: each rank read only its regions, de-interleaved q/k/v per KV group,
    split gate/up, and skipped Megatron's vocabulary padding (which holds noise)."""
    got = results[plan]["megatron"]
    assert got["llama"] == hf["llama"]
    if plan in ("T1", "P2:T2"):
        assert got["qwen2"] == hf["qwen2"]


def test_megatron_config_from_saved_args_and_detection(megatron_root, tiny_models):
    hf_cfg = ModelConfig.from_pretrained(tiny_models["llama"])
    cfg = ModelConfig.open(f"{megatron_root}/llama_root")  # format auto: the save root
    assert cfg.format == "megatron" and cfg.path.endswith("iter_0000007")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "tie_word_embeddings", "qkv_bias"):
        assert getattr(cfg, field) == getattr(hf_cfg, field), field
    ck = MegatronCheckpoint(cfg)
    assert ck.stacked and ck.prefix == ""
    ck = MegatronCheckpoint(ModelConfig.open(f"{megatron_root}/qwen2_tp2",
                                             hf_config_path=tiny_models["qwen2"]))
    assert not ck.stacked


def test_megatron_checkpoint_errors(megatron_root, tiny_models, tmp_path):
    def error(path, **kw) -> str:
        with pytest.raises(SeesawError) as e:
            MegatronCheckpoint(ModelConfig.open(path, **kw))
        return str(e.value)

    qwen2 = f"{megatron_root}/qwen2_tp2"
    assert error(qwen2) == (f"{qwen2} saved no training arguments and has no config.json; "
                            "give the model's HF config.json with model.hf_config_path")
    assert error(qwen2, hf_config_path=tiny_models["wide"]) == (
        "tensor decoder.layers.0.self_attention.linear_qkv.weight has shape [128, 64] but "
        "the model's config implies [512, 256]")
    assert error(str(tmp_path), format="megatron") == (
        f"{tmp_path} has no metadata.json: not a megatron-core distributed checkpoint")
    (tmp_path / "mp_rank_00").mkdir()
    assert error(str(tmp_path)) == (f"{tmp_path} is a legacy Megatron checkpoint "
                                    "(mp_rank_*/*.pt pickles); save it with --ckpt-format "
                                    "torch_dist")
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("12")
    assert error(str(tmp_path)) == (f"{tmp_path}/latest_checkpointed_iteration.txt names "
                                    f"iteration '12', which is not a folder of {tmp_path}")
    zarr = tmp_path / "zarr"
    zarr.mkdir()
    (zarr / "metadata.json").write_text('{"sharded_backend": "zarr"}')
    assert error(str(zarr)) == (f"{zarr}: sharded backend 'zarr' is not supported; "
                                "supported: torch_dist (Megatron-LM's --ckpt-format "
                                "torch_dist)")


@pytest.mark.parametrize("plan", ["T1", "P2:T2"])
def test_sleep_returns_memory_and_wakes_to_the_same_outputs(results, plan):
    r = results[plan]["sleep"]
    # level 1: the KV cache (CPU stages view the host shards, which stay)
    assert r["freed_1"] >= 0.8 * r["kv_bytes"], r
    # level 2: the KV cache and the weights
    assert r["freed_2"] >= 0.8 * (r["kv_bytes"] + r["weight_bytes"]), r
    assert r["after_1"] == r["before"] and r["after_2"] == r["before"]
    assert r["asleep_error"] == ("the engine is asleep (kv_cache, weights freed by sleep()); "
                                 "call wake_up() first")
    assert r["update_asleep_error"] == ("update_weights while asleep: call wake_up() (or "
                                        "wake_up(tags=['weights'])) first")
    assert r["bad_tag_error"] == "wake_up: unknown tags ['kv']; known: ['weights', 'kv_cache']"
    assert r["discarded_error"].startswith("the weights were discarded by sleep(level=2): ")
    assert r["discarded_error"].endswith(" shard tensors have no values yet; call "
                                         "update_weights with every parameter before "
                                         "generate")


@pytest.mark.parametrize("plan", ["T1", "P2:T2"])
def test_infer_cli_runs_a_megatron_checkpoint(results, plan):
    """``launch/infer.py model.format=megatron model.path=... model.tokenizer=...`` writes
    what the API generates from the HF folder of the same weights."""
    r = results[f"cli {plan}"]
    assert r["code"] == 0
    assert r["got"] == r["expected"] and all(r["expected"])


def test_rl_loop_example_runs():
    """``examples/rl_loop.py`` (generate n samples, sleep, train, wake, update, repeat) runs
    as shipped, on one CPU rank."""
    import subprocess
    import sys

    from tests.conftest import REPO, launch_env

    proc = subprocess.run([sys.executable, "examples/rl_loop.py", "--rounds", "2"], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert [line.split(":")[0] for line in proc.stdout.splitlines()
            if line.startswith("step ")] == ["step 0", "step 1"]
