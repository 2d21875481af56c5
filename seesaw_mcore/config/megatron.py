"""Megatron checkpoints (megatron-core ``torch_dist``, as Megatron-LM and NeMo save them):
where the weights of a save folder are, and the model's architecture facts, read from the
training arguments the checkpoint saved (``common.pt``) as an HF config dict.

The tensors themselves are read by ``model/megatron_checkpoint.py``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
from typing import Any

from seesaw_mcore.errors import SeesawError

TRACKER = "latest_checkpointed_iteration.txt"  # Megatron-LM's save root names its last save


def looks_like_megatron(path: str) -> bool:
    """A Megatron save root or a distributed checkpoint folder (``metadata.json`` naming
    its sharded backend), as opposed to an HF folder."""
    if os.path.isfile(os.path.join(path, TRACKER)):
        return True
    meta = os.path.join(path, "metadata.json")
    if not os.path.isfile(meta):
        return bool(glob.glob(os.path.join(path, "mp_rank_*")))
    try:
        with open(meta, encoding="utf-8") as f:
            return "sharded_backend" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def checkpoint_dir(path: str) -> str:
    """The distributed checkpoint folder of ``path``: itself, or the iteration a Megatron-LM
    save root's tracker file names (``iter_0001000`` or ``release``).

    Raises:
        SeesawError: not a megatron-core ``torch_dist`` checkpoint (one line, saying what
            it is instead).
    """
    if not os.path.isdir(path):
        raise SeesawError(f"model path {path!r} is not a directory")
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as f:
            it = f.read().strip()
        sub = "release" if it == "release" else (f"iter_{int(it):07d}" if it.isdigit() else "")
        if not sub or not os.path.isdir(os.path.join(path, sub)):
            raise SeesawError(f"{tracker} names iteration {it!r}, which is not a folder "
                              f"of {path}")
        path = os.path.join(path, sub)
    meta = os.path.join(path, "metadata.json")
    if not os.path.isfile(meta):
        if glob.glob(os.path.join(path, "mp_rank_*")):
            raise SeesawError(f"{path} is a legacy Megatron checkpoint (mp_rank_*/*.pt "
                              "pickles); save it with --ckpt-format torch_dist")
        raise SeesawError(f"{path} has no metadata.json: not a megatron-core distributed "
                          "checkpoint")
    try:
        with open(meta, encoding="utf-8") as f:
            backend = json.load(f).get("sharded_backend")
    except (OSError, ValueError, AttributeError) as e:
        raise SeesawError(f"cannot read {meta}: {e}") from None
    if backend != "torch_dist":
        raise SeesawError(f"{path}: sharded backend {backend!r} is not supported; "
                          "supported: torch_dist (Megatron-LM's --ckpt-format torch_dist)")
    return os.path.abspath(path)


def saved_args(ckpt_dir: str) -> argparse.Namespace | None:
    """The training arguments Megatron-LM saved in ``common.pt`` (``None`` when it saved
    none). Read with ``weights_only=True``: only plain values, dtypes and the enums
    megatron-core puts in its arguments are unpickled, never arbitrary code."""
    import torch

    path = os.path.join(ckpt_dir, "common.pt")
    if not os.path.isfile(path):
        return None
    from seesaw_mcore.mcore import saved_arg_types

    allowed: list[Any] = [argparse.Namespace, *saved_arg_types()]
    try:
        with torch.serialization.safe_globals(allowed):
            common = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        raise SeesawError(
            f"cannot read the saved arguments in {path} ({str(e).splitlines()[0][:160]}); "
            "give the model's HF config.json with model.hf_config_path") from None
    args = common.get("args") if isinstance(common, dict) else None
    return args if isinstance(args, argparse.Namespace) else None


def hf_config_from_args(args: argparse.Namespace, vocab_size: int | None,
                        where: str) -> dict[str, Any]:
    """An HF ``config.json`` dict (Llama, or Qwen2 with q/k/v biases) for the GPT model
    Megatron-LM's arguments describe.

    Args:
        args: the saved training arguments.
        vocab_size: the tokenizer's vocabulary (``None``: the arguments' ``vocab_size``,
            which Megatron-LM saves for its null tokenizer).
        where: the checkpoint folder, for errors.

    Raises:
        SeesawError: a model this engine does not run (named), or no vocabulary size.
    """
    def get(name: str, default: Any = None) -> Any:
        value = getattr(args, name, default)
        return default if value is None else value

    refusals = [
        (get("num_experts", 0), "mixture-of-experts (num_experts) checkpoints"),
        (get("normalization", "LayerNorm") != "RMSNorm",
         f"normalization={get('normalization', 'LayerNorm')} (RMSNorm only)"),
        (not get("swiglu", False), "MLPs without SwiGLU (--swiglu)"),
        (get("position_embedding_type", "learned_absolute") != "rope",
         f"position_embedding_type={get('position_embedding_type', 'learned_absolute')} "
         "(rope only)"),
        (get("add_bias_linear", True), "linear biases (--disable-bias-linear is required)"),
        (get("qk_layernorm", False), "q/k layer norms (qk_layernorm)"),
        (get("apply_layernorm_1p", False), "apply_layernorm_1p"),
        (float(get("rotary_percent", 1.0)) != 1.0, "rotary_percent < 1"),
    ]
    for refused, what in refusals:
        if refused:
            raise SeesawError(f"{where}: the saved arguments describe {what}, which this "
                              "engine does not run")
    vocab = vocab_size or get("vocab_size")
    if not vocab:
        raise SeesawError(f"{where}: the saved arguments have no vocab_size; give "
                          "model.tokenizer (an HF tokenizer folder) or model.hf_config_path")
    heads = int(get("num_attention_heads"))
    hidden = int(get("hidden_size"))
    raw: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM" if get("add_qkv_bias", False)
                          else "LlamaForCausalLM"],
        "model_type": "qwen2" if get("add_qkv_bias", False) else "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("ffn_hidden_size")),
        "num_hidden_layers": int(get("num_layers")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("num_query_groups", heads))
        if get("group_query_attention", False) else heads,
        "head_dim": int(get("kv_channels", hidden // heads)),
        "rms_norm_eps": float(get("norm_epsilon", 1e-5)),
        "max_position_embeddings": int(get("max_position_embeddings", 0)
                                       or get("seq_length")),
        "tie_word_embeddings": not get("untie_embeddings_and_output_weights", False),
        "rope_theta": float(get("rotary_base", 10000)),
        "torch_dtype": "bfloat16" if get("bf16", False) else (
            "float16" if get("fp16", False) else "float32"),
    }
    if get("use_rope_scaling", False):  # Megatron-LM's Llama 3.1 scaling
        raw["rope_scaling"] = {"rope_type": "llama3",
                               "factor": float(get("rope_scaling_factor", 8.0)),
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 8192}
    return raw
