"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3; Qwen3-MoE and Mixtral with
``model/moe.py``'s expert MLP) as one pipeline stage on megatron-core
tensor-parallel layers.

A stage owns a contiguous range of decoder layers; the first stage also embeds tokens, the
last also normalizes and projects to vocabulary logits. Moving hidden states between stages
is the model runner's job.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from seesaw_mcore.config import ModelConfig, padded_vocab_size, split_layers
from seesaw_mcore.contract import RankInfo
from seesaw_mcore.mcore import ModelParallelConfig, tensor_parallel
from seesaw_mcore.model.attention import AttentionMetadata, paged_attention
from seesaw_mcore.model.layers import (
    PACKED_TILE_ROWS,
    ColumnLinear,
    CPUPackedLinear,
    RMSNorm,
    Rotary,
    RowLinear,
    TPAllReduce,
    apply_rotary,
)
from seesaw_mcore.model.lora_layers import ActiveLoRA
from seesaw_mcore.model.moe import MoEMLP


def _no_init(_tensor: torch.Tensor) -> None:
    """Weights always come from the checkpoint; skip megatron-core's random init."""


class Embedding(tensor_parallel.VocabParallelEmbedding):
    """``VocabParallelEmbedding`` with an inference forward using ``TPAllReduce``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reduce = TPAllReduce(self.tp_group)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if self.reduce.size == 1:
            return F.embedding(ids, self.weight)  # [T, H]
        outside = (ids < self.vocab_start_index) | (ids >= self.vocab_end_index)  # [T]
        local = (ids - self.vocab_start_index).masked_fill(outside, 0)  # [T]
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)  # [T, H]
        return self.reduce(out)


class DecoderLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP; TP splits heads and the MLP's intermediate size."""

    def __init__(self, cfg: ModelConfig, mp: ModelParallelConfig, info: RankInfo,
                 layer: int = 0) -> None:
        super().__init__()
        self.lora: ActiveLoRA | None = None  # this forward's adapters (``set_lora``)
        self.index = 0  # its local index in the stage (the adapters' key)
        tp, d, group = info.layout.tp, cfg.head_dim, info.tp_group
        self.hq, self.hkv, self.d = cfg.num_heads // tp, cfg.num_kv_heads // tp, d
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * d
        common = dict(config=mp, init_method=_no_init, tp_group=group)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, mp.params_dtype)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's D, before RoPE
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, mp.params_dtype)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, mp.params_dtype)
        self.qkv = ColumnLinear(cfg.hidden_size, qkv_out, bias=cfg.qkv_bias, **common)
        self.o_proj = RowLinear(
            cfg.num_heads * d, cfg.hidden_size, bias=False, input_is_parallel=True,
            skip_bias_add=False, **common,
        )
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, mp.params_dtype)
        self.moe = self.gate_up = self.down = None
        if cfg.is_moe_layer(layer):  # global layer index: Qwen3-MoE has dense layers too
            self.moe = MoEMLP(cfg, info, mp.params_dtype)
            return
        self.gate_up = ColumnLinear(
            cfg.hidden_size, 2 * cfg.intermediate_size, bias=False, **common)
        self.down = RowLinear(
            cfg.intermediate_size, cfg.hidden_size, bias=False, input_is_parallel=True,
            skip_bias_add=False, **common,
        )

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        kv: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        after_attention: Callable[[], None] | None = None,
    ) -> torch.Tensor:
        """``x`` ``[T, H]`` -> ``[T, H]``; writes this step's K/V into ``kv`` and then calls
        ``after_attention`` (the KV may leave while the MLP runs)."""
        t = x.shape[0]
        h = self.input_norm(x)
        qkv = self.qkv(h)  # [T, (hq + 2 hkv) D]
        if self.lora is not None:
            self.lora.add(self.index, "qkv", h, qkv)
        q, k, v = qkv.split([self.hq * self.d, self.hkv * self.d, self.hkv * self.d], dim=-1)
        q = q.view(t, self.hq, self.d)  # [T, hq, D]
        k = k.view(t, self.hkv, self.d)  # [T, hkv, D]
        v = v.view(t, self.hkv, self.d)  # [T, hkv, D]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, k, rope)
        attn = paged_attention(q, k, v.contiguous(), kv[0], kv[1], meta)  # [T, hq, D]
        if after_attention is not None:
            after_attention()
        attn = attn.reshape(t, self.hq * self.d)  # [T, hq D]
        if self.lora is None:
            x = x + self.o_proj(attn)
        else:
            out = self.o_proj.partial(attn)  # [T, H] this rank's partial sums
            self.lora.add(self.index, "o_proj", attn, out)
            x = x + self.o_proj.finish(out)
        return x + self.mlp(x)

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU MLP of the residual stream ``x`` (normed here, by ``post_norm``):
        ``[T, H] -> [T, H]`` (summed over TP).

        With oneDNN-packed weights (CPU ranks) a long input runs row tile by row tile, so
        each tile's ``[tile, 2I/TP]`` intermediate is still in cache for SiLU and the down
        projection, instead of a ``[T, 2I/TP]`` round trip through memory (3.5x faster
        SiLU-and-multiply at a 4,000-token prefill); the TP all-reduce stays one call.
        """
        t = x.shape[0]
        if self.moe is not None:
            return self.moe(self.post_norm(x))
        if self.lora is None and (self.gate_up.packed is None or t <= PACKED_TILE_ROWS):
            gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)  # [T, I/TP] each
            return self.down(F.silu(gate) * up)
        tile = PACKED_TILE_ROWS if self.gate_up.packed is not None else t
        out = torch.empty_like(x)  # [T, H] this rank's partial sums
        for s in range(0, t, tile):
            rows = (s, min(s + tile, t))
            h = self.post_norm(x[rows[0]:rows[1]])
            gate_up = self.gate_up(h)  # [tile, 2I/TP]
            if self.lora is not None:
                self.lora.add(self.index, "gate_up", h, gate_up, rows)
            gate, up = gate_up.chunk(2, dim=-1)
            act = F.silu(gate) * up  # [tile, I/TP]
            part = self.down.partial(act)  # [tile, H]
            if self.lora is not None:
                self.lora.add(self.index, "down", act, part, rows)
            out[rows[0]:rows[1]] = part
        return self.down.finish(out)


class LlamaStage(nn.Module):
    """The part of the model one rank runs under one parallel layout."""

    def __init__(
        self,
        cfg: ModelConfig,
        info: RankInfo,
        dtype: torch.dtype,
        vocab_multiple: int = 64,
    ) -> None:
        super().__init__()
        layout = info.layout
        mp = ModelParallelConfig(
            tensor_model_parallel_size=layout.tp,
            pipeline_model_parallel_size=layout.pp,
            use_cpu_initialization=True,
            perform_initialization=False,
            params_dtype=dtype,
            pipeline_dtype=dtype,
        )
        self.cfg, self.info = cfg, info
        self.vocab_pad = padded_vocab_size(cfg.vocab_size, layout.tp, vocab_multiple)
        self.layer_range = split_layers(cfg.num_layers, layout.pp)[info.pp_rank]
        self.embed = None
        if info.is_first_stage:
            self.embed = Embedding(
                self.vocab_pad, cfg.hidden_size, init_method=_no_init, config=mp,
                tp_group=info.tp_group,
            )
        self.layers = nn.ModuleList(DecoderLayer(cfg, mp, info, layer)
                                    for layer in range(*self.layer_range))
        self.norm = self.lm_head = None
        if info.is_last_stage:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.lm_head = ColumnLinear(
                cfg.hidden_size, self.vocab_pad, bias=False, config=mp, init_method=_no_init,
                tp_group=info.tp_group,
            )
        self.rotary = Rotary(cfg.hf_config, cfg.head_dim, cfg.max_position_embeddings)
        self.requires_grad_(False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
        after_attention: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Runs this stage.

        Args:
            x: token ids ``[T]`` on the first stage, hidden states ``[T, H]`` otherwise.
            positions: ``[T]`` position of each token in its sequence.
            kv_cache: per local layer, ``(k_blocks, v_blocks)``.
            meta: the step's attention metadata.
            after_attention: called with the local layer index once that layer has written
                its KV (async swap-out hooks in here).

        Returns:
            Hidden states ``[T, H]`` (normalized on the last stage).
        """
        if self.embed is not None:
            x = self.embed(x)  # [T, H]
        rope = self.rotary.at(positions, x.dtype)  # [T, 1, D] each, for every layer
        for i, (layer, kv) in enumerate(zip(self.layers, kv_cache)):
            hook = None if after_attention is None else partial(after_attention, i)
            x = layer(x, rope, kv, meta, hook)
        if self.norm is not None:
            x = self.norm(x)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last stage only: ``[N, H]`` normalized hidden -> ``[N, vocab]`` float32 logits."""
        local = self.lm_head(hidden)  # [N, Vp/TP]
        tp = self.info.layout.tp
        if tp > 1:
            parts = [torch.empty_like(local) for _ in range(tp)]
            dist.all_gather(parts, local.contiguous(), group=self.info.tp_group)
            local = torch.cat(parts, dim=-1)  # [N, Vp]
        return local[:, : self.cfg.vocab_size].float().contiguous()

    def bind_shard(self, shard: dict[str, torch.Tensor], device: torch.device) -> int:
        """Makes a host shard (see ``loader.load_shard``) the parameters: tensors already on
        ``device`` are used as they are (a view, no copy), others are copied there.

        Returns:
            Bytes copied.
        """
        params = dict(self.named_parameters())
        missing, unexpected = sorted(set(params) - set(shard)), sorted(set(shard) - set(params))
        if missing or unexpected:
            raise RuntimeError(f"shard mismatch: missing={missing} unexpected={unexpected}")
        copied = 0
        for name, p in params.items():
            t = shard[name]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise RuntimeError(f"shard tensor {name} is {tuple(t.shape)} {t.dtype}, the "
                                   f"stage expects {tuple(p.shape)} {p.dtype}")
            if t.device != device:
                t = t.to(device, non_blocking=True)
                copied += t.numel() * t.element_size()
            p.data = t
        self.rotary.place(device)  # the device's shared RoPE tables: no copy per switch
        self.to(device)  # other buffers
        self.repack()
        return copied

    def set_lora(self, lora: ActiveLoRA | None) -> None:
        """The adapters (and their rows) the next forwards apply; ``None``: the base model."""
        for j, layer in enumerate(self.layers):
            layer.lora, layer.index = lora, j

    def record_routes(self, on: bool) -> None:
        """Whether this stage's MoE layers keep each forward's expert ids (``routes``)."""
        for layer in self.layers:
            if layer.moe is not None:
                layer.moe.record = on

    def routes(self, tokens: int) -> torch.Tensor:
        """The last forward's expert ids ``[T, MoE layers here, top_k]`` int16 (layer
        order)."""
        got = [layer.moe.routes for layer in self.layers if layer.moe is not None]
        if not got:
            return torch.empty(tokens, 0, self.cfg.num_experts_per_tok, dtype=torch.int16,
                               device=self.rotary.cos.device)
        return torch.stack(got, dim=1)

    def idle_moe(self, passes: int) -> None:
        """An E layout's rank with fewer forwards in a step than its E peers: takes part in
        each missing forward's MoE exchanges with no tokens."""
        for _ in range(passes):
            for layer in self.layers:
                if layer.moe is not None:
                    layer.moe.idle()

    def repack(self) -> None:
        """Re-packs the oneDNN copies of float32 weights (CPU ranks) after they changed."""
        for m in self.modules():
            if isinstance(m, CPUPackedLinear):
                m.pack_for_cpu()
