"""The interface the engine drives: one scheduler for all DP replicas of a plan."""

from __future__ import annotations

from typing import Protocol

from seesaw_mcore.contract import Step, Switch
from seesaw_mcore.engine.request import Sequence
from seesaw_mcore.engine.scheduler.batching import PrefixStats


class SchedulerInterface(Protocol):
    """What ``Engine.step`` needs from a scheduler; ``ReplicaSchedulers`` (static plans) and
    ``PhaseScheduler`` (Seesaw plans) implement it.

    A scheduler holds queues and block/slot allocations, never tensors. ``schedule`` returns
    every replica's next step or a switch; ``finish`` frees a finished sequence's KV.
    """

    num_preemptions: int  # recompute and swap
    num_swap_preemptions: int  # of those, KV swapped out to a tier and back
    num_handed_back: int  # swapped out mid-decode for a prefill phase (Seesaw policy)
    prefix: PrefixStats  # (re)prefill tokens and prefix-cache hits

    def add(self, seq: Sequence) -> None:
        """Queues a new sequence for prefill."""

    @property
    def num_waiting(self) -> int:
        """Sequences waiting for prefill (new or preempted)."""

    def has_work(self) -> bool:
        """Whether any sequence is unfinished."""

    def schedule(self) -> Step | Switch:
        """The next step of every replica, or a switch to the other phase."""

    def finish(self, seq: Sequence) -> None:
        """Removes a finished sequence and frees what it holds."""

    def abort(self, seq: Sequence) -> None:
        """Removes a sequence in any state (waiting, on the device, in a tier) and frees
        every block and tier slot it holds."""

    def release_device(self) -> None:
        """Every sequence on the device gives its blocks back and waits for prefill again
        (its tokens kept; its KV recomputed): the device KV is about to be freed."""

    def reset_prefix_cache(self) -> None:
        """Nothing cached so far is findable any more (new weights; freed device KV)."""

    def limit_hits(self, accept) -> None:
        """Prefills take only prefix-cache hits whose block hashes ``accept`` (a callable;
        ``None``: any)."""

    def tier_usage(self) -> float | None:
        """The KV tiers' load (Seesaw plans), ``None`` without tiers."""

    def kv_usage(self) -> float:
        """Share of the device KV blocks that sequences hold now (the active layout's)."""

    @property
    def tier_shared_tokens(self) -> int:
        """KV tokens stored in a tier by reference, not written (Seesaw plans; else 0)."""
