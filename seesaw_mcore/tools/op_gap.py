"""Op by op: this engine's kernels against megatron-core ``GPTModel``'s on the same inputs
(``tools/logprob_gap.py --ops``).

One forward of ``GPTModel`` (float32, TP=1) over a prompt, with hooks on its first layer
and its head capturing each op's inputs and output; each input then goes through the op
the engine runs in its place (batch-invariant mode, CPU ranks), and the two outputs are
compared. An op whose outputs are bitwise equal is one the two forwards share; the others
are where the rollout's and the trainer's numbers part, with the size of the difference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seesaw_mcore import env
from seesaw_mcore.config import ModelConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model import cpu_attention, invariant
from seesaw_mcore.model.layers import CPUPackedLinear, RMSNorm, apply_rotary, rope_tables
from seesaw_mcore.tools.mcore_reference import on_cpu

# the engine's float32 linear on CPU ranks (``SEESAW_CPU_PACKED_LINEAR=0``: ``F.linear``)
LINEAR = "oneDNN packed sgemm" if env.cpu_packed_linear() else "F.linear (MKL sgemm)"
# op -> (the engine's kernel, megatron-core's)
KERNELS = {
    "input_layernorm": ("RMSNorm, float32 mean of squares", "torch.nn.RMSNorm"),
    "rope (q)": ("q * cos + rotate_half(q) * sin, HF tables", "apply_rotary_pos_emb"),
    "rope (k)": ("q * cos + rotate_half(q) * sin, HF tables", "apply_rotary_pos_emb"),
    "core_attention": ("paged C++ kernel: per-query softmax, keys in order",
                       "DotProductAttention: baddbmm, fused softmax, bmm"),
    "linear_proj": (LINEAR, "torch.matmul (MKL sgemm)"),
    "pre_mlp_layernorm": ("RMSNorm, float32 mean of squares", "torch.nn.RMSNorm"),
    "linear_fc1": (LINEAR, "torch.matmul (MKL sgemm)"),
    "swiglu": ("silu(gate) * up", "megatron glu: silu(gate) * up"),
    "linear_fc2": (LINEAR, "torch.matmul (MKL sgemm)"),
    "final_layernorm": ("RMSNorm, float32 mean of squares", "torch.nn.RMSNorm"),
    "output_layer": (LINEAR, "torch.matmul (MKL sgemm)"),
}


class _Linear(CPUPackedLinear):
    """The engine's linear for a weight, as its stages run it (oneDNN-packed on CPU ranks
    unless ``SEESAW_CPU_PACKED_LINEAR=0``; at least 16 rows)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self.pack_for_cpu()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, None)


def _norm(module, x: torch.Tensor, eps: float) -> torch.Tensor:
    ours = RMSNorm(x.shape[-1], eps)
    ours.weight.data = module.weight.detach()
    return ours(x)


@torch.no_grad()
def compare_ops(cfg: ModelConfig, gpt, prompt: list[int]) -> list[dict]:
    """``[{"op", "max_abs", "bitwise", "engine", "megatron"}]`` for ``KERNELS``' ops.

    Args:
        cfg: the model.
        gpt: its float32 ``GPTModel`` (``mcore_reference.build_gpt``).
        prompt: token ids of the forward.
    """
    from megatron.core.transformer import attention as mattn

    device = next(gpt.parameters()).device
    if device.type != "cpu":
        raise SeesawError(f"the op table compares with CPU ranks' kernels (this rank runs on "
                          f"{device.type}): run --ops on CPU ranks")
    layer, caps = gpt.decoder.layers[0], {}

    def keep(name):  # copies: the forward adds residuals into some outputs in place
        def hook(_mod, args, kwargs, out):
            caps[name] = (_copy(args), kwargs, _copy(out))
        return hook

    mods = {"input_layernorm": layer.input_layernorm,
            "core_attention": layer.self_attention.core_attention,
            "linear_proj": layer.self_attention.linear_proj,
            "pre_mlp_layernorm": layer.pre_mlp_layernorm,
            "linear_fc1": layer.mlp.linear_fc1, "linear_fc2": layer.mlp.linear_fc2,
            "final_layernorm": gpt.decoder.final_layernorm, "output_layer": gpt.output_layer}
    handles = [m.register_forward_hook(keep(n), with_kwargs=True) for n, m in mods.items()]
    ropes: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = mattn.apply_rotary_pos_emb

    def rope(t, *args, **kwargs):
        out = original(t, *args, **kwargs)
        if len(ropes) < 2:  # the first layer's q, then k
            ropes.append((t.clone(), out.clone()))
        return out

    mattn.apply_rotary_pos_emb = rope
    t = len(prompt)
    mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)[None, None]
    try:
        with on_cpu(device):
            gpt(torch.tensor([prompt]), torch.arange(t).unsqueeze(0), attention_mask=mask)
    finally:
        mattn.apply_rotary_pos_emb = original
        for h in handles:
            h.remove()
    was = invariant.enabled()
    invariant.enable(True)
    try:
        pairs = _ours(cfg, gpt, caps, ropes)
    finally:
        invariant.enable(was)
    return [{"op": name, "max_abs": float((a.float() - b.float()).abs().max()),
             "bitwise": bool(torch.equal(a, b)), "engine": KERNELS[name][0],
             "megatron": KERNELS[name][1]} for name, (a, b) in pairs.items()]


def _ours(cfg: ModelConfig, gpt, caps: dict, ropes: list) -> dict:
    """Per op: (the engine's output, ``GPTModel``'s) on ``GPTModel``'s captured input."""
    eps = cfg.rms_norm_eps
    layer = gpt.decoder.layers[0]

    def first(name):  # the op's first input and its output, as [T, ...] (batch 1)
        args, _, out = caps[name]
        out = out[0] if isinstance(out, tuple) else out
        return args[0].squeeze(1), out.squeeze(1)

    pairs = {}
    for name, mod in (("input_layernorm", layer.input_layernorm),
                      ("pre_mlp_layernorm", layer.pre_mlp_layernorm),
                      ("final_layernorm", gpt.decoder.final_layernorm)):
        x, y = first(name)
        pairs[name] = (_norm(mod, x, eps), y)
    (q, q_out), (k, k_out) = ropes
    t = q.shape[0]
    cos, sin = rope_tables(cfg.hf_config, cfg.head_dim, cfg.max_position_embeddings,
                           torch.device("cpu"))
    qr, kr = apply_rotary(q.squeeze(1), k.squeeze(1),
                          (cos[:t].unsqueeze(1), sin[:t].unsqueeze(1)))
    pairs["rope (q)"], pairs["rope (k)"] = (qr, q_out.squeeze(1)), (kr, k_out.squeeze(1))
    args, _, out = caps["core_attention"]
    pairs["core_attention"] = (_paged(*(a.squeeze(1) for a in args[:3])).flatten(1),
                               out.squeeze(1))
    for name, mod in (("linear_proj", layer.self_attention.linear_proj),
                      ("linear_fc1", layer.mlp.linear_fc1), ("linear_fc2", layer.mlp.linear_fc2),
                      ("output_layer", gpt.output_layer)):
        x, y = first(name)
        w = mod.weight if mod.weight is not None else gpt.shared_embedding_or_output_weight()
        pairs[name] = (_Linear(w.detach())(x), y)
    gate, up = first("linear_fc1")[1].chunk(2, dim=-1)
    pairs["swiglu"] = (F.silu(gate) * up, first("linear_fc2")[0])
    return pairs


def _copy(x):
    """Tensors (in tuples) cloned, the rest as it is."""
    if isinstance(x, tuple):
        return tuple(_copy(v) for v in x)
    return x.clone() if isinstance(x, torch.Tensor) else x


def _paged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 16) -> torch.Tensor:
    """The engine's paged attention of one causal sequence: ``q`` ``[T, Hq, D]``, ``k``,
    ``v`` ``[T, Hkv, D]`` written into blocks, one call -> ``[T, Hq, D]``."""
    t, hkv, d = k.shape
    nb = -(-t // block)
    kc = k.new_zeros(nb * block, hkv, d)
    vc = v.new_zeros(nb * block, hkv, d)
    kc[:t], vc[:t] = k, v
    tables = torch.arange(nb, dtype=torch.int32).unsqueeze(0)
    return cpu_attention.paged_attention_cpu(
        q.contiguous(), kc.view(nb, block, hkv, d), vc.view(nb, block, hkv, d), tables,
        torch.tensor([0, t], dtype=torch.int32), torch.tensor([t], dtype=torch.int32))
