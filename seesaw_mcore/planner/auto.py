"""``plan=auto`` and the planner's ranking: the cost model on a preset or this machine's
measured profile."""

from __future__ import annotations

import os
from dataclasses import asdict

from seesaw_mcore.errors import SeesawError
from seesaw_mcore.planner.cost_model import PRESETS, CostModel, Hardware, ModelShape, workload


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


def choose_plan(model: str, workload_name: str = "sharegpt") -> tuple[str, str]:
    """``plan=auto``: the best pair for this job's ranks under their measured profile (every
    rank calls this; rank 0 decides, logs its choice and the runner-up, and broadcasts)."""
    import logging

    import torch.distributed as dist

    from seesaw_mcore.planner.profile import cache_file, load_or_measure, measure
    from seesaw_mcore.runtime import groups

    _, world = groups.init_distributed()
    box: list = [os.path.isfile(cache_file(world))]
    dist.broadcast_object_list(box, src=0)  # measure together, or all load rank 0's file
    hw = load_or_measure(world) if box[0] else measure()
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            ranking = CostModel(ModelShape.from_config(model), hw).rank(world,
                                                                        workload(workload_name))
            box[0] = ranking[:2]
        except SeesawError as e:
            box[1] = str(e)
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise SeesawError(f"plan=auto: {box[1]}")
    best, *rest = box[0]
    if dist.get_rank() == 0:
        log = logging.getLogger("seesaw_mcore")
        runner_up = (f"; runner-up {rest[0]['prefill']} -> {rest[0]['decode']} "
                     f"({rest[0]['tokens_per_s']:.0f} tok/s)" if rest else "")
        log.info("plan=auto (%s, workload %s): %s -> %s, predicted %.0f tok/s%s", hw.name,
                 workload_name, best["prefill"], best["decode"], best["tokens_per_s"],
                 runner_up)
    return best["prefill"], best["decode"]
