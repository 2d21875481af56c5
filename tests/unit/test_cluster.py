"""Slurm's variables -> torch.distributed's (seesaw_mcore/runtime/cluster.py)."""

from __future__ import annotations

import pytest

from seesaw_mcore.errors import SeesawError
from seesaw_mcore.runtime import cluster

STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3",
        "SLURM_STEP_NUM_TASKS": "4", "SLURM_NODEID": "1", "SLURM_LOCALID": "1",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)", "MASTER_ADDR": "node7"}


def test_tasks_per_node():
    assert cluster.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert cluster.tasks_per_node("4") == [4]
    with pytest.raises(SeesawError, match=r"SLURM_STEP_TASKS_PER_NODE='2x3' is not Slurm's"):
        cluster.tasks_per_node("2x3")


def test_slurm_env_maps_a_step():
    assert cluster.in_srun_step(STEP)
    assert cluster.slurm_env(STEP) == {
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_SIZE": "2",
        "MASTER_ADDR": "node7", "MASTER_PORT": str(20000 + 4242 % 20000)}


def test_not_a_step():
    assert not cluster.in_srun_step({**STEP, "RANK": "0"})  # a launcher set RANK
    batch = {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"}  # the batch script
    assert not cluster.in_srun_step(batch)
    assert "not under srun" in cluster.world_hint(batch)
    assert cluster.world_hint({}) == ""


@pytest.mark.parametrize("change,message", [
    ({"SLURM_PROCID": "4"}, "Slurm variables disagree: SLURM_PROCID=4 but the step has 4 tasks"),
    ({"SLURM_STEP_TASKS_PER_NODE": "2,1"},
     r"Slurm variables disagree: 4 tasks but per-node counts \[2, 1\]"),
    ({"SLURM_LOCALID": "2"}, "Slurm variables disagree: SLURM_LOCALID=2 but node 1 runs 2 tasks"),
    ({"SLURM_NODEID": "x"}, "Slurm variable SLURM_NODEID='x' is not a non-negative integer"),
])
def test_inconsistent_variables(change, message):
    with pytest.raises(SeesawError, match=message):
        cluster.slurm_env({**STEP, **change})
