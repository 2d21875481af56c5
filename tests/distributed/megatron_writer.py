"""Writes Megatron checkpoints of two HF test models the way Megatron-LM saves them: a
megatron-core ``GPTModel`` on each of 4 CPU ranks holds its TP/PP part of the HF weights
(converted as Megatron-LM's HF loader does), and ``dist_checkpointing.save`` writes
``torch_dist``. Run under the launcher with 4 ranks:

    python -m tests.distributed.megatron_writer <hf llama> <hf qwen2> <hf demo> <out root>

- ``<out>/llama_root``: a save root (``latest_checkpointed_iteration.txt`` ->
  ``iter_0000007``) of the untied Llama (3 layers) saved at TP=2, PP=2 (2 + 1 layers), layers
  stacked, the training arguments in ``common.pt`` (vocab_size as the null tokenizer saves
  it), the vocabulary padded as Megatron-LM pads it (256 rows; the padding holds noise).
- ``<out>/qwen2_tp2``: the tied Qwen2 (q/k/v biases) saved at TP=2 (DP=2), one key per layer
  (``non_homogeneous_layers``), no arguments: its config comes from the HF folder.
- ``<out>/demo``: the bundled demo model (tied, 5 layers) saved at TP=1 (DP=4), for the
  command lines (``launch/infer.py``, ``launch/eval.py``) with ``model.tokenizer``.

megatron-core 0.16.1's writer calls ``torch.cuda.synchronize`` and makes its failure flag on
``torch.cuda.current_device()``; on CPU ranks both are pointed at the CPU (nothing else in
the save touches CUDA).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from seesaw_mcore.tools.mcore_reference import hf_tensors, megatron_params, padded_vocab


def save(hf_path: str, out: str, tp: int, pp: int, per_layer_keys: bool,
         save_args: bool) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(hf_path)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tp, pp)
    tcfg = TransformerConfig(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads, num_query_groups=cfg.num_key_value_heads,
        ffn_hidden_size=cfg.intermediate_size,
        kv_channels=cfg.hidden_size // cfg.num_attention_heads,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps, add_bias_linear=False,
        add_qkv_bias=cfg.model_type == "qwen2", use_cpu_initialization=True,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        pipeline_dtype=torch.float32,
        num_layers_in_first_pipeline_stage=(cfg.num_hidden_layers + 1) // 2 if pp == 2 else None)
    model = GPTModel(tcfg, get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=padded_vocab(cfg.vocab_size, tp),
                     max_sequence_length=cfg.max_position_embeddings,
                     position_embedding_type="rope",
                     share_embeddings_and_output_weights=cfg.tie_word_embeddings,
                     pre_process=ps.is_pipeline_first_stage(),
                     post_process=ps.is_pipeline_last_stage())
    params = megatron_params(hf_tensors(hf_path), cfg, tp, ps.get_tensor_model_parallel_rank(),
                             model.decoder.layers[0].layer_number - 1, len(model.decoder.layers),
                             ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage())
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert set(state) <= set(params), (sorted(params), sorted(state))
    with torch.no_grad():
        for name, value in state.items():  # a tied head on one stage is the embedding
            value.copy_(params[name])
    metadata = {"non_homogeneous_layers": True} if per_layer_keys else None
    sharded = {"model": model.sharded_state_dict(metadata=metadata), "iteration": 7}
    if save_args:  # what Megatron-LM saves (the fields the engine reads, and more)
        sharded["args"] = argparse.Namespace(
            num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size,
            ffn_hidden_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
            group_query_attention=True, num_query_groups=cfg.num_key_value_heads,
            kv_channels=None, max_position_embeddings=cfg.max_position_embeddings,
            seq_length=64, normalization="RMSNorm", norm_epsilon=cfg.rms_norm_eps, swiglu=True,
            position_embedding_type="rope", rotary_base=10000, rotary_percent=1.0,
            use_rope_scaling=False, add_bias_linear=False, add_qkv_bias=False,
            untie_embeddings_and_output_weights=not cfg.tie_word_embeddings,
            vocab_size=cfg.vocab_size, padded_vocab_size=padded_vocab(cfg.vocab_size, tp),
            num_experts=None,
            bf16=False, fp16=False, params_dtype=torch.float32,
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, iteration=7)
    if dist.get_rank() == 0:
        os.makedirs(out, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(sharded, out)
    dist.barrier()


def main() -> None:
    llama, qwen2, demo, root = sys.argv[1:5]
    dist.init_process_group("gloo")
    torch.cuda.synchronize = lambda *a, **k: None  # megatron-core's writer, on CPU ranks
    torch.cuda.current_device = lambda: "cpu"
    save(llama, os.path.join(root, "llama_root", "iter_0000007"), 2, 2, False, True)
    save(qwen2, os.path.join(root, "qwen2_tp2"), 2, 1, True, False)
    save(demo, os.path.join(root, "demo"), 1, 1, False, True)
    if dist.get_rank() == 0:
        with open(os.path.join(root, "llama_root", "latest_checkpointed_iteration.txt"),
                  "w") as f:
            f.write("7")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
