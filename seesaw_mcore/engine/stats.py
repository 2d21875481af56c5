"""What the run report prints, and the per-step trace the benchmarks plot."""

from __future__ import annotations

from dataclasses import dataclass, field

from seesaw_mcore.contract import Phase, Step, Switch
from seesaw_mcore.kv.transfer import TransferStats


@dataclass
class EngineStats:
    """Counters over an engine's life (rank 0's view; ``swap`` is this rank's own)."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    prefill_steps: int = 0
    decode_steps: int = 0
    preemptions: int = 0  # recompute and swap
    swap_preemptions: int = 0  # of those, KV swapped out to a tier and back
    handed_back: int = 0  # sequences swapped out mid-decode for a prefill phase (policy)
    switches: int = 0
    switch_s: float = 0.0
    swap: TransferStats = field(default_factory=TransferStats)  # this rank's tier traffic
    prefill_tokens: int = 0  # tokens of sequences at their (re)prefill
    cached_tokens: int = 0  # of those, taken from the prefix cache (not computed)
    tier_shared_tokens: int = 0  # KV tokens stored in a tier by reference (not written)

    @property
    def computed_tokens(self) -> int:
        """Prompt (and recomputed) tokens the prefill steps computed."""
        return self.prefill_tokens - self.cached_tokens

    @property
    def prefix_hit_rate(self) -> float:
        """Share of (re)prefill tokens the prefix cache held (vLLM's hit rate)."""
        return self.cached_tokens / self.prefill_tokens if self.prefill_tokens else 0.0

    def add_step(self, step: Step, seconds: float) -> None:
        """Counts an executed step (in ``step.phase``)."""
        if step.phase == Phase.PREFILL:
            self.prefill_s += seconds
            self.prefill_steps += 1
        else:
            self.decode_s += seconds
            self.decode_steps += 1

    def add_switch(self, seconds: float) -> None:
        self.switches += 1
        self.switch_s += seconds

    def add_scheduler(self, sched) -> None:
        """Adds a finished run's scheduler counters (``SchedulerInterface``)."""
        self.preemptions += sched.num_preemptions
        self.swap_preemptions += sched.num_swap_preemptions
        self.handed_back += sched.num_handed_back
        self.prefill_tokens += sched.prefix.queried
        self.cached_tokens += sched.prefix.hit
        self.tier_shared_tokens += sched.tier_shared_tokens


@dataclass(frozen=True)
class StepTiming:
    """The last step (or switch) rank 0 ran: what ``plan=auto``'s trial measures."""

    phase: Phase  # the phase it ran in (a switch: the phase switched to)
    switch: bool  # a phase switch or a move to another plan
    seconds: float
    step: Step | Switch | None  # what ran (``None``: a move to another plan)


@dataclass(frozen=True)
class TraceEvent:
    """One step (or switch) as rank 0 saw it, for timelines."""

    t: float  # seconds since the run started, at the end of the step
    phase: str  # the phase the step ran in (a switch: the phase switched to)
    switch: bool
    num_seqs: int  # sequences in the step
    num_tokens: int  # tokens fed in the step
    tier_usage: float | None  # KV tiers' load (Seesaw plans), see ``PhaseScheduler``
