"""``plan=auto`` and the planner's ranking: the cost model on a preset or this machine's
measured profile, under a job's engine limits."""

from __future__ import annotations

import os
from dataclasses import asdict

from seesaw_mcore import env
from seesaw_mcore.config import EngineConfig, kv_bytes_per_token
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.planner.cost_model import CostModel, ModelShape
from seesaw_mcore.planner.hardware import GIB, PRESETS, Hardware
from seesaw_mcore.planner.workload import EngineLimits, workload


def hardware(name: str, world: int) -> Hardware:
    """A preset, or the measured profile of this machine (``measure``)."""
    if name == "measure":
        from seesaw_mcore.planner.profile import load_or_measure

        return load_or_measure(world)
    if name not in PRESETS:
        raise SeesawError(f"unknown gpu {name!r}; presets: {', '.join(PRESETS)}, measure")
    return PRESETS[name]


def plan(model: str, gpu: str, world: int, workload_name: str = "sharegpt",
         prompt_len: float | None = None, output_len: float | None = None) -> dict:
    """The ranking as ``--json`` prints it: best pair, its prediction, every valid pair."""
    if world < 1:
        raise SeesawError(f"--num-gpus must be >= 1, got {world}")
    wl = workload(workload_name, prompt_len, output_len)
    hw = hardware(gpu, world)
    ranking = CostModel(ModelShape.from_config(model), hw).rank(world, wl)
    best = ranking[0]
    return {"prefill": best["prefill"], "decode": best["decode"],
            "predicted_tokens_per_s": best["tokens_per_s"], "ranking": ranking,
            "hardware": asdict(hw), "workload": asdict(wl)}


def engine_limits(config: EngineConfig) -> EngineLimits:
    """The limits a job's ``EngineConfig`` puts on the cost model's batches (the KV budget
    as configured on CPU ranks, or blocks; the host tier as configured)."""
    from seesaw_mcore.runtime import groups
    from seesaw_mcore.runtime.dtype import resolve_dtype

    cache, sched = config.cache, config.scheduler
    cfg = config.model.open()
    cpu = groups.device().type == "cpu"
    kv_token = kv_bytes_per_token(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim,
                                  resolve_dtype(config.dtype, cfg).itemsize)
    host = (cache.host_kv_tokens * kv_token if cache.host_kv_tokens is not None
            else cache.host_kv_gib * GIB)
    return EngineLimits(max_num_seqs=sched.max_num_seqs,
                        max_prefill_tokens=sched.max_prefill_tokens,
                        prefill_micro_batches=sched.prefill_micro_batches,
                        block_size=cache.block_size,
                        kv_cache_bytes=cache.kv_cache_bytes(cpu),
                        kv_blocks=cache.num_blocks, host_tier_bytes=host)


def auto_candidates(config: EngineConfig) -> tuple[CostModel, list[dict]]:
    """``plan=auto``: the cost model of this job's ranks (their measured profile, the job's
    limits) and its best ``config.auto_candidates`` plans (one without the trial), best
    first. Every rank calls this; rank 0 ranks and broadcasts, and logs the pick.

    Raises:
        SeesawError: no plan of the job's ranks holds the model.
    """
    import logging

    import torch.distributed as dist

    from seesaw_mcore.planner.profile import cache_file, load_or_measure, measure
    from seesaw_mcore.runtime import groups

    _, world = groups.init_distributed(config.runtime.dist_timeout_s)
    box: list = [os.path.isfile(cache_file(world))]
    dist.broadcast_object_list(box, src=0)  # measure together, or all load rank 0's file
    hw = load_or_measure(world) if box[0] else measure()
    model = CostModel(ModelShape.of(config.model.open()), hw,
                      engine_limits(config))
    n = config.auto_candidates if config.auto_trial and not _time_shared() else 1
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box[0] = model.rank(world, workload(config.workload))[:max(n, 2)]
        except SeesawError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise SeesawError(f"plan=auto: {box[1]}")
    rows = box[0]
    if dist.get_rank() == 0:
        best, rest = rows[0], rows[1:]
        others = "; ".join(f"{r['prefill']} -> {r['decode']} ({r['tokens_per_s']:.0f} tok/s)"
                           for r in rest)
        logging.getLogger("seesaw_mcore").info(
            "plan=auto (%s, workload %s): %s -> %s, predicted %.0f tok/s%s", hw.name,
            config.workload, best["prefill"], best["decode"], best["tokens_per_s"],
            f"; {'trial candidates' if n > 1 else 'runner-up'} {others}" if rest else "")
        if config.auto_trial and n == 1:
            logging.getLogger("seesaw_mcore").info(
                "plan=auto: no trial: %d CPU ranks share %d cores, so step times measure the "
                "OS scheduler", env.local_world_size(), os.cpu_count())
    return model, rows[:n]


def _time_shared() -> bool:
    """CPU ranks with fewer cores than ranks on the node: they time-share cores."""
    from seesaw_mcore.runtime import groups

    return (groups.device().type == "cpu"
            and env.local_world_size() > (os.cpu_count() or 1))
