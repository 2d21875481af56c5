"""The software half of the ``measure`` profile: what a step, a DP replica, a decoder layer, a
pipeline micro-batch and a switch cost on this machine's ranks beyond their bytes and FLOPs,
and what decode attention reads per second.

The engine itself is timed, not a stand-in: small random-weight Llamas (hidden 128, so their
FLOPs and bytes are negligible) at two depths decode under ``T{w}``, ``D{w}`` and ``T{w} ->
P{w}``; each layout's step time is a line in the layer count, and the lines give the terms:

- ``D{w}`` (no communication inside a replica): intercept = ``step_s``, slope = ``layer_s``;
- ``T{w}``: intercept - ``step_s`` = ``tp_step_s``, slope - ``layer_s`` = two all-reduces;
- ``P{w}`` decode (``w`` micro-batches through ``w`` stages: ``2w - 1`` stage slots of
  ``layers / w`` layers and one send/recv each): intercept - ``step_s`` = ``(2w - 1) x`` one
  micro-batch's send/recv, slope = ``(2w - 1) / w x pp_layer_s``;
- the ``T{w} -> P{w}`` run's switches: ``switch_s``.

Every rank calls ``calibrate``; rank 0 writes the models (once, in the cache directory).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from seesaw_mcore import env
from seesaw_mcore.planner.hardware import GIB, Hardware

log = logging.getLogger("seesaw_mcore")

_SHAPE = dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=8,
              intermediate_size=256, vocab_size=512)
_PROMPT, _TOKENS, _ROUNDS = 8, 32, 3


def best_time(fn, repeats: int = 5) -> float:
    """Shortest of ``repeats`` timed calls (after a warm-up), every rank at once."""
    from seesaw_mcore.runtime import groups

    acc = groups.accelerator()
    fn()
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        acc.synchronize()
        t0 = time.perf_counter()
        fn()
        acc.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def write_llama(path: str, num_layers: int) -> str:
    """A random-weight Llama HF folder (``config.json`` + ``model.safetensors``) of
    ``_SHAPE`` and ``num_layers`` layers."""
    import json

    from safetensors.torch import save_file

    h, i, v = _SHAPE["hidden_size"], _SHAPE["intermediate_size"], _SHAPE["vocab_size"]
    d = h // _SHAPE["num_attention_heads"]
    q, kv = _SHAPE["num_attention_heads"] * d, _SHAPE["num_key_value_heads"] * d
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,),
              "lm_head.weight": (v, h)}
    for n in range(num_layers):
        p = f"model.layers.{n}."
        for name, shape in (("self_attn.q_proj", (q, h)), ("self_attn.k_proj", (kv, h)),
                            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, q)),
                            ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i)), ("input_layernorm", (h,)),
                            ("post_attention_layernorm", (h,))):
            shapes[f"{p}{name}.weight"] = shape
    weights = {k: (torch.ones(s) if len(s) == 1 else torch.randn(*s, generator=g) * 0.02)
               for k, s in shapes.items()}
    os.makedirs(path, exist_ok=True)
    save_file(weights, os.path.join(path, "model.safetensors"))
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama",
                  num_hidden_layers=num_layers, max_position_embeddings=512, rms_norm_eps=1e-5,
                  rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="float32",
                  bos_token_id=1, eos_token_id=2, **_SHAPE)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)  # written last: a folder with config.json is complete
    return path


def _models(world: int) -> tuple[tuple[int, str], tuple[int, str]]:
    """Two depths ``(layers, folder)``, written by rank 0 once per machine."""
    depths = (max(2, world), max(2, world) + 8)
    out = tuple((n, os.path.join(env.cache_dir(), f"calibrate-llama-{n}")) for n in depths)
    if dist.get_rank() == 0:
        for n, path in out:
            if not os.path.isfile(os.path.join(path, "config.json")):
                write_llama(path, n)
    dist.barrier()
    return out


def _decode_step_s(path: str, plan: str, num_seqs: int, dtype: torch.dtype
                   ) -> tuple[float, float]:
    """``(seconds per decode step, seconds per switch)`` of the engine on ``plan``: the best
    of ``_ROUNDS`` runs of ``num_seqs`` sequences, after a warm-up run."""
    from seesaw_mcore.config import EngineConfig
    from seesaw_mcore.engine.engine import Engine
    from seesaw_mcore.runtime.reshard import internal_moves
    from seesaw_mcore.sampling_params import SamplingParams

    name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
    cfg = EngineConfig.from_kwargs(path, plan=plan, num_blocks=64, host_kv_tokens=4096,
                                   dtype=name[dtype])
    engine = Engine(cfg)
    params = SamplingParams(temperature=0, max_tokens=_TOKENS, ignore_eos=True)
    with internal_moves():  # its switches are measurements (logged with runtime.verbose)
        best = _rounds(engine, num_seqs, params)
    box = [best]
    dist.broadcast_object_list(box, src=0)  # rank 0 timed the steps
    return box[0][0], box[0][1]


def _rounds(engine, num_seqs: int, params) -> list[float]:
    """``[seconds per decode step, seconds per switch]``, each the best of ``_ROUNDS`` timed
    runs (after a warm-up) of ``num_seqs`` sequences on ``engine``; closes it."""
    from seesaw_mcore.engine.request import Sequence

    best = [float("inf"), float("inf")]
    try:
        for rnd in range(_ROUNDS + 1):
            st = engine.stats
            d0, n0, s0, k0 = st.decode_s, st.decode_steps, st.switch_s, st.switches
            if engine.is_driver:
                with engine.session():
                    for i in range(num_seqs):
                        engine.add(Sequence(i, i, 0, [3 + (i + j) % 500 for j in range(_PROMPT)],
                                            params, 0, _TOKENS))
                    while engine.has_unfinished():
                        engine.step()
            else:
                engine.serve()
            if rnd:  # the first run warms up
                step = (st.decode_s - d0) / max(st.decode_steps - n0, 1)
                switch = (st.switch_s - s0) / (st.switches - k0) if st.switches > k0 else 0.0
                best = [min(best[0], step), min(best[1], switch)]
    finally:
        engine.close()
    return best


def _line(points: list[tuple[int, float]]) -> tuple[float, float]:
    """``(intercept, slope)`` through two ``(layers, seconds)`` points."""
    (x1, y1), (x2, y2) = points
    slope = (y2 - y1) / (x2 - x1)
    return y1 - slope * x1, slope


def _costs(points: list[tuple[int, float]]) -> tuple[float, float]:
    """A step's fixed cost and a layer's cost from the line through two points, each at
    least 5% of the shallow model's step (on a busy machine noise can tilt the line to a
    negative intercept or slope; neither cost is ever zero)."""
    step, layer = _line(points)
    (x1, y1), _ = points
    return max(step, 0.05 * y1), max(layer, 0.05 * y1 / x1)


def _attention_gbs(dtype: torch.dtype) -> float:
    """KV bytes per second of one decode attention call (16 sequences x 1,024 tokens of
    context, 8 KV heads of 64), this rank's kernel, every rank at once."""
    from seesaw_mcore.model.attention import AttentionMetadata, paged_attention, random_paged_case
    from seesaw_mcore.runtime import groups

    dev, batch, ctx, hkv, d, bs = groups.device(), 16, 1024, 8, 64, 16
    q, kc, vc, tables = random_paged_case([1] * batch, [ctx] * batch, heads=hkv, kv_heads=hkv,
                                          head_dim=d, block_size=bs, dtype=dtype)
    q, kc, vc = q.to(dev), kc.to(dev), vc.to(dev)
    meta = AttentionMetadata.build([1] * batch, [ctx] * batch, tables, bs, dev)
    k = torch.randn(batch, hkv, d, dtype=dtype, device=dev)
    seconds = best_time(lambda: paged_attention(q, k, k, kc, vc, meta))
    return 2 * batch * ctx * hkv * d * dtype.itemsize / seconds / GIB


def calibrate(hw: Hardware, dtype: torch.dtype) -> Hardware:
    """``hw`` with this machine's software costs (every rank calls this)."""
    world = dist.get_world_size()
    t0 = time.perf_counter()
    attn = min(_gather(_attention_gbs(dtype)))
    (l1, small), (l2, deep) = _models(world)
    models = ((l1, small), (l2, deep))
    tp = [(n, _decode_step_s(p, f"T{world}", 2 * world, dtype)[0]) for n, p in models]
    step_s, layer_s = _costs(tp)
    terms = dict(attn_gbs=attn, step_s=step_s, layer_s=layer_s)
    if world > 1:
        dp = [(n, _decode_step_s(p, f"D{world}", 2 * world, dtype)[0]) for n, p in models]
        pp = [(n, *_decode_step_s(p, f"T{world}:P{world}", 2 * world, dtype)) for n, p in models]
        step_s, layer_s = _costs(dp)
        tp_step, tp_slope = _line(tp)
        pp_step, pp_slope = _line([(n, t) for n, t, _ in pp])
        slots = 2 * world - 1
        terms.update(
            step_s=step_s, layer_s=layer_s,
            tp_step_s=max(tp_step - step_s, 0.0),
            allreduce_latency_s=max((tp_slope - layer_s) / 2, hw.allreduce_latency_s),
            pp_layer_s=max(pp_slope * world / slots, 0.0),
            microbatch_s=max((pp_step - step_s) / slots - hw.p2p_latency_s, 0.0),
            switch_s=min(s for _, _, s in pp))
        points = dict(tp=tp, dp=dp, pp=pp)
    else:
        points = dict(tp=tp)
    if dist.get_rank() == 0:
        log.debug("calibration points (layers, seconds per decode step): %s", points)
        log.info("calibrated in %.1f s: %s", time.perf_counter() - t0,
                 ", ".join(f"{k} {v:.3g}" for k, v in terms.items()))
    return replace(hw, **terms)


def _gather(value: float) -> list[float]:
    box: list = [None] * dist.get_world_size()
    dist.all_gather_object(box, value)
    return box
