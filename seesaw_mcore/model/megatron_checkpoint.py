"""Megatron checkpoint (megatron-core ``torch_dist``) -> the weight shard of one
(tp_rank, pp_rank), read through ``megatron.core.dist_checkpointing``.

A megatron-core GPT checkpoint holds each tensor whole in its global shape, cut into the
chunks its saving ranks held; any plan of this engine reads it, whatever TP/PP it was saved
at: each rank asks ``dist_checkpointing.load`` for just the regions of its shard (one call
per layout, collective over the job's ranks), and DCP reads the chunks that overlap them.

Names and layouts (as megatron-core's ``GPTModel.sharded_state_dict`` writes them):

- ``embedding.word_embeddings.weight`` / ``output_layer.weight``: ``[padded vocab, H]``
  (Megatron pads the vocabulary; the rows past the model's are not read).
- ``decoder.layers.self_attention.linear_qkv.weight``: ``[L, G (q_per_group + 2) D, H]``,
  layers stacked on a leading axis (``decoder.layers.N.*`` without it when saved with
  ``non_homogeneous_layers``); each of the G KV groups is its query heads' rows, then its
  key head's, then its value head's.
- ``mlp.linear_fc1.weight``: ``[L, 2 I, H]``, all gate rows then all up rows.
- the layer norms folded into the linear that follows them
  (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``), or
  ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight`` where a checkpoint names them so.
- ``decoder.final_layernorm.weight``; a model prefix (NeMo's ``module.``) is found and kept.
"""

from __future__ import annotations

import torch

from seesaw_mcore import mcore  # noqa: F401  (megatron-core's one import path)
from seesaw_mcore.config import ModelConfig, padded_vocab_size, split_layers
from seesaw_mcore.errors import SeesawError

_NORMS = {  # our name -> the names megatron-core may save it under (first found is used)
    "input_norm": ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    "post_norm": ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
}


class MegatronCheckpoint:
    """An opened megatron-core distributed checkpoint, validated against the model config.

    Args:
        cfg: the model (``cfg.path`` is the checkpoint folder, ``cfg.format`` "megatron").
    """

    fused_qkv = fused_gate_up = True  # for callers that ask an HF ``Checkpoint``

    def __init__(self, cfg: ModelConfig) -> None:
        from megatron.core import dist_checkpointing

        self.cfg = cfg
        try:
            meta = dist_checkpointing.load_tensors_metadata(cfg.path)
        except Exception as e:  # noqa: BLE001 - DCP raises many types for a bad folder
            raise SeesawError(f"cannot read the checkpoint metadata in {cfg.path}: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None
        self.shapes = {k: tuple(v.global_shape) for k, v in meta.items()}
        self.dtypes = {k: v.dtype for k, v in meta.items()}
        embed = [k for k in self.shapes if k.endswith("embedding.word_embeddings.weight")]
        if not embed:
            raise SeesawError(f"{cfg.path} has no embedding.word_embeddings.weight: not a "
                              "megatron-core GPT checkpoint")
        self.prefix = embed[0][: -len("embedding.word_embeddings.weight")]
        self.stacked = self._key("decoder.layers.self_attention.linear_qkv.weight") in self.shapes
        self.norms = {ours: next((n for n in names if self._has_layer_tensor(n)), names[0])
                      for ours, names in _NORMS.items()}
        self._validate()

    def _key(self, name: str) -> str:
        return self.prefix + name

    def _layer_key(self, layer: int, name: str) -> str:
        return self._key(f"decoder.layers.{name}" if self.stacked
                         else f"decoder.layers.{layer}.{name}")

    def _has_layer_tensor(self, name: str) -> bool:
        return self._layer_key(0, name) in self.shapes

    def _expected(self) -> dict[str, tuple[int, ...]]:
        """Every tensor this engine reads and its global shape."""
        c = self.cfg
        h, d, i = c.hidden_size, c.head_dim, c.intermediate_size
        qkv = (c.num_heads + 2 * c.num_kv_heads) * d
        layer = {"self_attention.linear_qkv.weight": (qkv, h),
                 "self_attention.linear_proj.weight": (h, c.num_heads * d),
                 "mlp.linear_fc1.weight": (2 * i, h),
                 "mlp.linear_fc2.weight": (h, i),
                 self.norms["input_norm"]: (h,), self.norms["post_norm"]: (h,)}
        if c.qkv_bias:
            layer["self_attention.linear_qkv.bias"] = (qkv,)
        out: dict[str, tuple[int, ...]] = {}
        for name, shape in layer.items():
            if self.stacked:
                out[self._layer_key(0, name)] = (c.num_layers, *shape)
            else:
                out.update({self._layer_key(n, name): shape for n in range(c.num_layers)})
        out[self._key("decoder.final_layernorm.weight")] = (h,)
        return out

    def _validate(self) -> None:
        c = self.cfg
        for key, shape in self._expected().items():
            if key not in self.shapes:
                raise SeesawError(f"tensor {key} is missing from the checkpoint in {c.path}")
            if self.shapes[key] != shape:
                raise SeesawError(f"tensor {key} has shape {list(self.shapes[key])} but the "
                                  f"model's config implies {list(shape)}")
            if not self.dtypes[key].is_floating_point:
                raise SeesawError(f"tensor {key} has dtype {self.dtypes[key]}; expected a "
                                  "floating-point type")
        heads = [self._key("embedding.word_embeddings.weight")]
        if not c.tie_word_embeddings:
            heads.append(self._key("output_layer.weight"))
        for key in heads:
            shape = self.shapes.get(key)
            if shape is None:
                raise SeesawError(f"tensor {key} is missing from the checkpoint in {c.path}")
            if len(shape) != 2 or shape[1] != c.hidden_size or shape[0] < c.vocab_size:
                raise SeesawError(f"tensor {key} has shape {list(shape)} but the model's "
                                  f"config implies [>= {c.vocab_size}, {c.hidden_size}]")

    def load_shard(self, spec, dtype: torch.dtype,
                   vocab_multiple: int = 64) -> dict[str, torch.Tensor]:
        """The shard of ``spec`` (a ``loader.ShardSpec``), keyed as ``loader.load_shard``'s.

        Collective: every rank of the job calls it once per layout, in the same order.
        """
        c, t, r = self.cfg, spec.tp, spec.tp_rank
        d, i = c.head_dim, c.intermediate_size
        qpg = c.num_heads // c.num_kv_heads  # query heads per KV group
        rows = (qpg + 2) * d  # one KV group's rows of linear_qkv
        g0, g1 = r * c.num_kv_heads // t, (r + 1) * c.num_kv_heads // t  # this rank's groups
        start, end = split_layers(c.num_layers, spec.pp)[spec.pp_rank]
        reads = _Reads(self)
        qkv = {kind: reads.layers(f"self_attention.linear_qkv.{kind}", start, end,
                                  (g0 * rows, g1 * rows))
               for kind in (("weight", "bias") if c.qkv_bias else ("weight",))}
        proj = reads.layers("self_attention.linear_proj.weight", start, end,
                            cols=(r * c.num_heads * d // t, (r + 1) * c.num_heads * d // t))
        s, e = r * i // t, (r + 1) * i // t
        gate = reads.layers("mlp.linear_fc1.weight", start, end, (s, e))
        up = reads.layers("mlp.linear_fc1.weight", start, end, (i + s, i + e))
        down = reads.layers("mlp.linear_fc2.weight", start, end, cols=(s, e))
        norms = {ours: reads.layers(name, start, end) for ours, name in self.norms.items()}
        vocab_pad = padded_vocab_size(c.vocab_size, t, vocab_multiple)
        vs, ve = r * vocab_pad // t, (r + 1) * vocab_pad // t
        embed_key = self._key("embedding.word_embeddings.weight")
        head_key = embed_key if c.tie_word_embeddings else self._key("output_layer.weight")
        vocab = {}
        for key in {embed_key if spec.is_first else None, head_key if spec.is_last else None}:
            if key is not None:
                vocab[key] = reads.region(key, (min(vs, c.vocab_size), 0),
                                          (min(ve, c.vocab_size) - min(vs, c.vocab_size),
                                           c.hidden_size))
        final = reads.region(self._key("decoder.final_layernorm.weight"), (0,),
                             (c.hidden_size,)) if spec.is_last else None
        reads.load()

        out: dict[str, torch.Tensor] = {}
        if spec.is_first:
            out["embed.weight"] = _pad_rows(reads[vocab[embed_key]], ve - vs)
        for j in range(end - start):
            q = f"layers.{j}."
            for kind, ref in qkv.items():
                grouped = reads[ref][j].unflatten(0, (g1 - g0, qpg + 2, d))  # [g, qpg+2, D, ...]
                out[q + f"qkv.{kind}"] = torch.cat([
                    grouped[:, :qpg].flatten(0, 2),  # this rank's query heads, in head order
                    grouped[:, qpg].flatten(0, 1), grouped[:, qpg + 1].flatten(0, 1)])
            out[q + "o_proj.weight"] = reads[proj][j]
            out[q + "gate_up.weight"] = torch.cat([reads[gate][j], reads[up][j]])
            out[q + "down.weight"] = reads[down][j]
            for ours, ref in norms.items():
                out[q + f"{ours}.weight"] = reads[ref][j]
        if spec.is_last:
            out["norm.weight"] = reads[final]
            out["lm_head.weight"] = _pad_rows(reads[vocab[head_key]], ve - vs)
        return {k: v.to(dtype).contiguous() for k, v in out.items()}


class _Reads:
    """Regions of checkpoint tensors one rank asks for, read by one
    ``dist_checkpointing.load`` call."""

    def __init__(self, ckpt: MegatronCheckpoint) -> None:
        self.ckpt = ckpt
        self.request: dict[str, object] = {}
        self.groups: dict[str, list[str]] = {}  # a layers() handle -> its per-layer regions
        self.loaded: dict[str, torch.Tensor] = {}

    def region(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> str:
        """Asks for ``shape`` elements at ``offset`` of the global tensor ``key``; returns
        a handle (``self[handle]`` after ``load``). An empty region reads nothing."""
        from megatron.core.dist_checkpointing import ShardedTensor

        handle = f"r{len(self.request) + len(self.loaded)}"
        dtype = self.ckpt.dtypes[key]
        if 0 in shape:
            self.loaded[handle] = torch.empty(shape, dtype=dtype)
            return handle
        self.request[handle] = ShardedTensor(
            key=key, data=torch.empty(shape, dtype=dtype), dtype=dtype,
            local_shape=tuple(shape), global_shape=self.ckpt.shapes[key],
            global_offset=tuple(offset), axis_fragmentations=None)
        return handle

    def layers(self, name: str, start: int, end: int, rows: tuple[int, int] | None = None,
               cols: tuple[int, int] | None = None) -> str:
        """Layers ``[start, end)`` of the per-layer tensor ``name``, its rows and/or
        columns cut; ``self[handle]`` is ``[end - start, ...]``."""
        ck = self.ckpt
        shape = list(ck.shapes[ck._layer_key(start, name)][1 if ck.stacked else 0:])
        offset = [0] * len(shape)
        for axis, cut in ((0, rows), (1, cols)):
            if cut is not None:
                offset[axis], shape[axis] = cut[0], cut[1] - cut[0]
        if ck.stacked:
            parts = [self.region(ck._layer_key(start, name), (start, *offset),
                                 (end - start, *shape))]
        else:
            parts = [self.region(ck._layer_key(n, name), tuple(offset), tuple(shape))
                     for n in range(start, end)]
        handle = f"g{len(self.groups)}"
        self.groups[handle] = parts
        return handle

    def load(self) -> None:
        from megatron.core import dist_checkpointing

        if self.request:  # every rank asks for something (norms at least): same calls
            try:
                got = dist_checkpointing.load(self.request, self.ckpt.cfg.path,
                                              common_strategy=no_common_state(),
                                              validate_access_integrity=False)
            except Exception as e:  # noqa: BLE001 - DCP wraps read errors its own ways
                raise SeesawError(f"reading {self.ckpt.cfg.path} failed: "
                                  f"{str(e).splitlines()[0][:300]}") from None
            self.loaded.update(got)

    def __getitem__(self, handle: str) -> torch.Tensor:
        if handle in self.groups:
            parts = [self.loaded[p] for p in self.groups[handle]]
            return parts[0] if self.ckpt.stacked else torch.stack(parts)
        return self.loaded[handle]


def no_common_state():
    """A ``dist_checkpointing.load`` common strategy that skips the common state
    (``common.pt``: training args, optimizer settings), which is not needed and not
    unpickled here (``config/megatron.py`` reads the args)."""
    from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy

    class _NoCommon(TorchCommonLoadStrategy):
        def load_common(self, checkpoint_dir):
            return {}

    return _NoCommon()


def _pad_rows(rows: torch.Tensor, n: int) -> torch.Tensor:
    """``rows`` followed by zero rows up to ``n`` (vocabulary padding)."""
    if rows.shape[0] == n:
        return rows
    return torch.cat([rows, rows.new_zeros(n - rows.shape[0], *rows.shape[1:])])
