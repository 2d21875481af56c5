"""The plan chooser: a pure cost model (``cost_model``), this machine's measured profile
(``profile``), ``plan=auto`` (``auto``) and the command line (``python -m seesaw_mcore.planner``).
"""

from seesaw_mcore.planner.auto import choose_plan, hardware, plan
from seesaw_mcore.planner.cost_model import (
    GIB,
    PRESETS,
    WORKLOADS,
    CostModel,
    Hardware,
    ModelShape,
    Workload,
    layouts,
    workload,
)

__all__ = ["GIB", "PRESETS", "WORKLOADS", "CostModel", "Hardware", "ModelShape", "Workload",
           "choose_plan", "hardware", "layouts", "plan", "workload"]
