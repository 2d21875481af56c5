"""Schedulers: the interface (``base``), static plans (``static``), Seesaw plans (``seesaw``)
and the batching code they share (``batching``)."""

from seesaw_mcore.engine.scheduler.base import SchedulerInterface
from seesaw_mcore.engine.scheduler.seesaw import PhaseScheduler
from seesaw_mcore.engine.scheduler.static import ReplicaScheduler, ReplicaSchedulers

__all__ = ["PhaseScheduler", "ReplicaScheduler", "ReplicaSchedulers", "SchedulerInterface"]
