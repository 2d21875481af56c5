"""Where this process sits in the job, from the launcher's environment.

The deepspeed launcher and torchrun set ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
``MASTER_ADDR`` / ``MASTER_PORT`` themselves. Under Slurm, ``srun`` starts one process per
task and sets only ``SLURM_*`` variables: ``slurm_env`` turns those into the torch ones
(``launch/slurm/infer.sbatch`` runs ``srun`` so). Nothing here builds a shell command.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Mapping

from seesaw_mcore import env
from seesaw_mcore.config import PhasePlan, check_world
from seesaw_mcore.errors import SeesawError


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name)
    if value is None or not re.fullmatch(r"\d+", value.strip()):
        raise SeesawError(f"Slurm variable {name}={value!r} is not a non-negative integer "
                          "(start the job with srun, as launch/slurm/infer.sbatch does)")
    return int(value)


def tasks_per_node(spec: str) -> list[int]:
    """Expands Slurm's compressed per-node task counts: ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise SeesawError(f"Slurm variable SLURM_STEP_TASKS_PER_NODE={spec!r} is not "
                              "Slurm's N(xM),... form")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list (``node[3-5],gpu7`` -> ``node3``), expanded by
    ``scontrol show hostnames`` (argument list, no shell)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,  # noqa: S607 - Slurm's own tool, found on PATH
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError) as e:
        raise SeesawError(f"cannot expand SLURM_STEP_NODELIST={nodelist!r} with scontrol "
                          f"({e}); set MASTER_ADDR to the first node's address") from None
    if not out:
        raise SeesawError(f"SLURM_STEP_NODELIST={nodelist!r} names no host")
    return out[0]


def in_srun_step(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a process started by ``srun`` (not the batch script itself, not a launcher
    that already set ``RANK``)."""
    return "RANK" not in environ and "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ


def slurm_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """torch.distributed's variables for a task started by ``srun``.

    Returns:
        ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_SIZE``, ``MASTER_ADDR`` and
        ``MASTER_PORT`` (the last two kept when already set; else the step's first node
        and a port derived from the job id, the same on every task).

    Raises:
        SeesawError: for Slurm variables that contradict each other.
    """
    rank = _int(environ, "SLURM_PROCID")
    world = _int(environ, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in environ
                 else "SLURM_NTASKS")
    if not 0 <= rank < world:
        raise SeesawError(f"Slurm variables disagree: SLURM_PROCID={rank} but the step has "
                          f"{world} tasks")
    node = _int(environ, "SLURM_NODEID")
    counts = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE")
                            or environ.get("SLURM_TASKS_PER_NODE") or str(world))
    if sum(counts) != world or node >= len(counts):
        raise SeesawError(f"Slurm variables disagree: {world} tasks but per-node counts "
                          f"{counts} (SLURM_STEP_TASKS_PER_NODE), node id {node}")
    local = _int(environ, "SLURM_LOCALID")
    if local >= counts[node]:
        raise SeesawError(f"Slurm variables disagree: SLURM_LOCALID={local} but node {node} "
                          f"runs {counts[node]} tasks")
    env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local),
           "LOCAL_SIZE": str(counts[node])}
    env["MASTER_ADDR"] = environ.get("MASTER_ADDR") or first_host(
        environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", ""))
    env["MASTER_PORT"] = environ.get("MASTER_PORT") or str(
        20000 + _int(environ, "SLURM_JOB_ID") % 20000)
    return env


def world_hint(environ: Mapping[str, str] = os.environ) -> str:
    """How Slurm sized this job, to append to a world-size error ("" outside Slurm)."""
    if "SLURM_JOB_ID" not in environ:
        return ""
    if in_srun_step(environ) or "SLURM_STEP_ID" in environ:
        counts = environ.get("SLURM_STEP_TASKS_PER_NODE", "?")
        return (f" (Slurm job {environ['SLURM_JOB_ID']}: {environ.get('SLURM_STEP_NUM_TASKS', '?')}"
                f" tasks, per node {counts}; request the plan's ranks with sbatch --nodes / "
                "--ntasks-per-node)")
    return (f" (inside Slurm job {environ['SLURM_JOB_ID']} but not under srun: start one "
            "process per task with srun, as launch/slurm/infer.sbatch does)")


def check_plans_fit(plans: list[PhasePlan], world: int, disk_tier: bool) -> None:
    """Raises ``SeesawError`` (one line, with the launcher's hint) unless every plan runs on
    this job's ``world`` ranks: its layouts' sizes, a disk tier only with a re-sharding
    plan, and a re-sharding plan only on one node (the host KV tier is per node)."""
    for plan in plans:
        try:
            check_world(plan.prefill, world)
        except SeesawError as e:
            raise SeesawError(f"{e}{world_hint()}") from None
        if disk_tier and all(p.is_static for p in plans):
            raise SeesawError(f"cache.disk_path needs a re-sharding plan; plan {plan} is "
                              f"static (its KV stays on the device)")
        if not plan.is_static and env.local_world_size() != world:
            raise SeesawError(
                f"plan {plan}: the host KV tier is per node, so a plan that re-shards "
                f"must run all {world} ranks on one node (this node has "
                f"{env.local_world_size()}); use a static plan across nodes{world_hint()}")
