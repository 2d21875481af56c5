"""The plan chooser: a pure cost model (``cost_model``, with ``hardware`` and ``workload``),
this machine's measured profile (``profile``), ``plan=auto`` (``auto``), its measured trial
(``trial``) and the command line (``python -m seesaw_mcore.planner``).
"""

from seesaw_mcore.planner.auto import auto_candidates, engine_limits, hardware, plan
from seesaw_mcore.planner.cost_model import CostModel, ModelShape, layouts
from seesaw_mcore.planner.hardware import GIB, PRESETS, Hardware
from seesaw_mcore.planner.workload import WORKLOADS, EngineLimits, Workload, workload

__all__ = ["GIB", "PRESETS", "WORKLOADS", "CostModel", "EngineLimits", "Hardware",
           "ModelShape", "Workload", "auto_candidates", "engine_limits", "hardware", "layouts",
           "plan", "workload"]
