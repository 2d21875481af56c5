"""megatron-core's ``GPTModel`` as a trainer holds it: the reference forward of
``tools/logprob_gap.py``, and the HF -> Megatron weight conversion the Megatron-writer test
saves checkpoints with.

The model is megatron-core's own (``get_gpt_layer_local_spec``: its ``DotProductAttention``,
RoPE, RMSNorm, tensor-parallel linears), at TP=1 and PP=1 on this rank. Its weights come
from the HF folder, converted as Megatron-LM's HF loader does (q/k/v interleaved per KV
group, gate and up fused in ``linear_fc1``), or from a Megatron checkpoint by
``dist_checkpointing.load`` (the trainer's own loader). On CPU ranks, the two places where
megatron-core 0.16.1's forward names CUDA (RoPE's ``inv_freq`` device and the dropout RNG
tracker's ``fork``, a no-op in eval) are pointed at the CPU for the forward (``on_cpu``).
Dense families only (Llama, Qwen2, Qwen3, Mistral within its window); default RoPE.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from seesaw_mcore.config import ModelConfig
from seesaw_mcore.errors import SeesawError


def hf_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder's safetensors files."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def padded_vocab(vocab: int, tp: int) -> int:
    """Megatron-LM's padding: a multiple of 128 x TP (--make-vocab-size-divisible-by 128)."""
    return -(-vocab // (128 * tp)) * 128 * tp


def megatron_params(hf: dict[str, torch.Tensor], cfg, tp: int, tp_rank: int, first_layer: int,
                    num_local: int, first: bool, last: bool) -> dict[str, torch.Tensor]:
    """The local parameters of megatron-core's ``GPTModel`` (local spec) for this rank, from
    full HF tensors (``cfg``: the HF config): q/k/v interleaved per KV group, gate and up
    fused in ``linear_fc1``; the vocabulary padded with noise rows that must never be
    read."""
    h, heads, groups = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or h // heads
    qpg = heads // groups

    def rows(t: torch.Tensor) -> torch.Tensor:
        return t.chunk(tp, 0)[tp_rank]

    def vocab(t: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(padded_vocab(t.shape[0], tp) - t.shape[0], h,
                            generator=torch.Generator().manual_seed(9))
        return rows(torch.cat([t, 100 * noise.to(t.dtype)]))

    out = {}
    if first:
        out["embedding.word_embeddings.weight"] = vocab(hf["model.embed_tokens.weight"])
    for j in range(num_local):
        p, q = f"model.layers.{first_layer + j}.", f"decoder.layers.{j}."
        for kind in ("weight", "bias"):
            if p + f"self_attn.q_proj.{kind}" not in hf:
                continue
            qw = hf[p + f"self_attn.q_proj.{kind}"].unflatten(0, (groups, qpg * d))
            kw = hf[p + f"self_attn.k_proj.{kind}"].unflatten(0, (groups, d))
            vw = hf[p + f"self_attn.v_proj.{kind}"].unflatten(0, (groups, d))
            out[q + f"self_attention.linear_qkv.{kind}"] = rows(
                torch.cat([qw, kw, vw], 1).flatten(0, 1))
        if p + "self_attn.q_norm.weight" in hf:  # Qwen3
            out[q + "self_attention.q_layernorm.weight"] = hf[p + "self_attn.q_norm.weight"]
            out[q + "self_attention.k_layernorm.weight"] = hf[p + "self_attn.k_norm.weight"]
        out[q + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"].chunk(
            tp, 1)[tp_rank]
        out[q + "mlp.linear_fc1.weight"] = torch.cat([rows(hf[p + "mlp.gate_proj.weight"]),
                                                      rows(hf[p + "mlp.up_proj.weight"])])
        out[q + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"].chunk(tp, 1)[tp_rank]
        out[q + "input_layernorm.weight"] = hf[p + "input_layernorm.weight"]
        out[q + "pre_mlp_layernorm.weight"] = hf[p + "post_attention_layernorm.weight"]
    if last:
        out["decoder.final_layernorm.weight"] = hf["model.norm.weight"]
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        out["output_layer.weight"] = vocab(hf[head])
    return out


def check_supported(cfg: ModelConfig) -> None:
    """One-line error unless the reference can hold this model."""
    if cfg.num_experts:
        raise SeesawError(f"the megatron-core reference holds dense models; {cfg.architecture} "
                          "is a mixture of experts")
    if cfg.rope_parameters.get("rope_type", "default") != "default":
        raise SeesawError(f"the megatron-core reference uses default RoPE; {cfg.path} has "
                          f"{cfg.rope_parameters['rope_type']!r}")


def build_gpt(cfg: ModelConfig, dtype: torch.dtype, tp: int = 1):
    """``GPTModel`` at TP=``tp``, PP=1 (this rank's part) with the checkpoint's weights, in
    ``dtype``, eval mode. megatron-core's ``parallel_state`` must be initialized with that
    TP and PP=1."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    check_supported(cfg)
    tcfg = TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_heads, num_query_groups=cfg.num_kv_heads,
        ffn_hidden_size=cfg.intermediate_size, kv_channels=cfg.head_dim,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        normalization="RMSNorm", layernorm_epsilon=cfg.rms_norm_eps, add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias, qk_layernorm=cfg.qk_norm, use_cpu_initialization=True,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, attention_dropout=0.0, hidden_dropout=0.0,
        tensor_model_parallel_size=tp)
    vocab = padded_vocab(cfg.vocab_size, tp)
    if cfg.format == "megatron":
        vocab = _saved_vocab(cfg.path)
    model = GPTModel(tcfg, get_gpt_layer_local_spec(normalization="RMSNorm",
                                                    qk_layernorm=cfg.qk_norm),
                     vocab_size=vocab, max_sequence_length=cfg.max_position_embeddings,
                     position_embedding_type="rope",
                     rotary_base=int(cfg.rope_parameters.get("rope_theta", 10000)),
                     share_embeddings_and_output_weights=cfg.tie_word_embeddings)
    if cfg.format == "megatron":
        _load_megatron(model, cfg.path)
    else:
        params = megatron_params(hf_tensors(cfg.path), cfg.hf_config, tp,
                                 ps.get_tensor_model_parallel_rank(), 0, cfg.num_layers, True,
                                 True)
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        with torch.no_grad():
            for name, value in state.items():
                value.copy_(params[name])
    from seesaw_mcore.runtime import groups

    return model.to(groups.device()).eval()  # this rank's accelerator (the CPU on CPU ranks)


def _saved_vocab(path: str) -> int:
    """The padded vocabulary rows of a Megatron checkpoint's embedding (its metadata)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(path).read_metadata()
    for key, item in meta.state_dict_metadata.items():
        if key.endswith("embedding.word_embeddings.weight"):
            return int(item.size[0])
    raise SeesawError(f"{path}: no embedding.word_embeddings.weight in the checkpoint")


def _load_megatron(model, path: str) -> None:
    """The checkpoint's weights through megatron-core's ``dist_checkpointing.load``."""
    from megatron.core import dist_checkpointing

    from seesaw_mcore.model.megatron_checkpoint import no_common_state

    state = dist_checkpointing.load(model.sharded_state_dict(), path,
                                    common_strategy=no_common_state())
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing:
        raise SeesawError(f"{path}: the checkpoint lacks {', '.join(missing[:3])}")


@contextlib.contextmanager
def on_cpu(device: torch.device) -> Iterator[None]:
    """megatron-core 0.16.1's forward on a CPU ``device``: RoPE moves its ``inv_freq`` to
    ``torch.cuda.current_device()`` (here: the CPU) and attention forks the CUDA RNG tracker
    around dropout (a no-op in eval: skipped). Nothing changes on an accelerator."""
    if device.type != "cpu":
        yield
        return
    from megatron.core import tensor_parallel

    tracker = tensor_parallel.get_cuda_rng_tracker()
    saved = torch.cuda.current_device, tracker.fork
    torch.cuda.current_device = lambda: "cpu"
    tracker.fork = lambda *a, **k: contextlib.nullcontext()
    try:
        yield
    finally:
        torch.cuda.current_device, tracker.fork = saved


@torch.no_grad()
def token_logprobs(model, ids: list[int], start: int, vocab: int) -> list[float]:
    """The logprob (float32 log-softmax of the logits over the ``vocab`` real tokens, as
    the engine and HF take it) of each token of ``ids`` from ``start`` on, given the tokens
    before it: one causal forward (every rank of the TP group calls it)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    t, dev = len(ids), next(model.parameters()).device
    x = torch.tensor([ids], device=dev)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=dev), 1)[None, None]  # masked
    with on_cpu(dev):
        logits = model(x, torch.arange(t, device=dev).unsqueeze(0),
                       attention_mask=mask)[0]  # [T, Vp/TP]
    tp = ps.get_tensor_model_parallel_world_size()
    if tp > 1:  # the vocabulary shards, gathered
        logits = logits.float()
        parts = [torch.empty_like(logits) for _ in range(tp)]
        dist.all_gather(parts, logits, group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)  # [T, Vp]
    return next_token_logprobs(logits[:, :vocab], ids, start)


def next_token_logprobs(logits: torch.Tensor, ids: list[int], start: int) -> list[float]:
    """From a causal forward's logits ``[T, V]`` over ``ids``: each token's float32
    log-softmax logprob from ``start`` on, given the tokens before it."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
    target = torch.tensor(ids[start:], device=logits.device).unsqueeze(1)
    return logp[start - 1:len(ids) - 1].gather(1, target).squeeze(1).tolist()
