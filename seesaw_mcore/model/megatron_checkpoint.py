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
from seesaw_mcore.config import ModelConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model.params import Cut, ShardSpec, shard_params

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

    def load_shard(self, spec: ShardSpec, dtype: torch.dtype,
                   vocab_multiple: int = 64) -> dict[str, torch.Tensor]:
        """The shard of ``spec``, made as ``params.shard_params`` describes it from the
        fused HF spellings, each cut read as the regions of megatron-core's tensors it
        maps to (``_regions``).

        Collective: every rank of the job calls it once per layout, in the same order.
        """
        params = shard_params(self.cfg, spec, True, True, vocab_multiple)
        reads = _Reads(self)
        cuts = dict.fromkeys(cut for param in params.values() for item in param.items
                             for cut in item)  # once each (a tied head is the embedding)
        handles = {cut: [reads.region(*region) for region in self._regions(cut)]
                   for cut in cuts}
        reads.load()

        def read(cut: Cut) -> torch.Tensor:
            return torch.cat([reads[h] for h in handles[cut]])

        return {key: p.assemble(read).to(dtype).contiguous() for key, p in params.items()}

    def _regions(self, cut: Cut) -> list[tuple[str, tuple[int, ...], tuple[int, ...], bool]]:
        """The (key, offset, shape, one layer of a stacked tensor) regions of megatron-core's
        tensors that make the HF ``cut``, in row order."""
        name, c = cut.name, self.cfg
        layer = None
        if name.startswith("model.layers."):
            parts = name.split(".")
            layer, rest = int(parts[2]), ".".join(parts[3:])
            names = {"self_attn.qkv_proj.weight": "self_attention.linear_qkv.weight",
                     "self_attn.qkv_proj.bias": "self_attention.linear_qkv.bias",
                     "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
                     "mlp.gate_up_proj.weight": "mlp.linear_fc1.weight",
                     "mlp.down_proj.weight": "mlp.linear_fc2.weight",
                     "input_layernorm.weight": self.norms["input_norm"],
                     "post_attention_layernorm.weight": self.norms["post_norm"]}
            if rest not in names:
                raise SeesawError(f"{c.path}: {c.family.name} checkpoints in Megatron format "
                                  f"are not read ({name} has no megatron-core name here)")
            key = self._layer_key(layer, names[rest])
        else:
            key = self._key({"model.embed_tokens.weight": "embedding.word_embeddings.weight",
                             "lm_head.weight": "output_layer.weight",
                             "model.norm.weight": "decoder.final_layernorm.weight"}[name])
        stacked = layer is not None and self.stacked
        shape = self.shapes[key][1:] if stacked else self.shapes[key]
        rows = [cut.rows or (0, shape[0])]
        if name.endswith((".qkv_proj.weight", ".qkv_proj.bias")):  # HF [q; k; v] -> KV groups
            rows = _grouped_rows(c, *rows[0])
        out = []
        for start, end in rows:
            offset, size = [start] + [0] * (len(shape) - 1), [end - start, *shape[1:]]
            if cut.cols is not None:
                offset[1], size[1] = cut.cols[0], cut.cols[1] - cut.cols[0]
            if stacked:
                offset, size = [layer, *offset], [1, *size]
            out.append((key, tuple(offset), tuple(size), stacked))
        return out


def _grouped_rows(c: ModelConfig, start: int, end: int) -> list[tuple[int, int]]:
    """Rows ``[start, end)`` of HF's fused ``[q; k; v]`` (head-aligned) as runs of
    megatron-core's ``linear_qkv`` rows, where each KV group holds its query heads' rows,
    then its key head's, then its value head's."""
    d, qpg = c.head_dim, c.num_heads // c.num_kv_heads
    group, qo, kvo = (qpg + 2) * d, c.num_heads * d, c.num_kv_heads * d
    runs: list[list[int]] = []
    for x in range(start, end, d):
        if x < qo:
            head = x // d
            row = head // qpg * group + head % qpg * d
        elif x < qo + kvo:
            row = (x - qo) // d * group + qpg * d
        else:
            row = (x - qo - kvo) // d * group + (qpg + 1) * d
        if runs and runs[-1][1] == row:
            runs[-1][1] = row + d
        else:
            runs.append([row, row + d])
    return [(a, b) for a, b in runs]


class _Reads:
    """Regions of checkpoint tensors one rank asks for, read by one
    ``dist_checkpointing.load`` call."""

    def __init__(self, ckpt: MegatronCheckpoint) -> None:
        self.ckpt = ckpt
        self.request: dict[str, object] = {}
        self.layer_of_stack: set[str] = set()  # regions of one layer of a stacked tensor
        self.loaded: dict[str, torch.Tensor] = {}

    def region(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...],
               one_layer: bool = False) -> str:
        """Asks for ``shape`` elements at ``offset`` of the global tensor ``key``; returns
        a handle (``self[handle]`` after ``load``, without its leading axis for
        ``one_layer`` of a stacked tensor). An empty region reads nothing."""
        from megatron.core.dist_checkpointing import ShardedTensor

        handle = f"r{len(self.request) + len(self.loaded)}"
        dtype = self.ckpt.dtypes[key]
        if one_layer:
            self.layer_of_stack.add(handle)
        if 0 in shape:
            self.loaded[handle] = torch.empty(shape, dtype=dtype)
            return handle
        self.request[handle] = ShardedTensor(
            key=key, data=torch.empty(shape, dtype=dtype), dtype=dtype,
            local_shape=tuple(shape), global_shape=self.ckpt.shapes[key],
            global_offset=tuple(offset), axis_fragmentations=None)
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
        t = self.loaded[handle]
        return t[0] if handle in self.layer_of_stack else t


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
