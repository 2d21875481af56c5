"""``plan=auto``'s measured trial: the cost model's top candidates each run a few steps of the
job's own first requests on the job's ranks, and the job continues on the fastest.

The trial runs inside the job's first ``generate`` call (rank 0 drives it; the other ranks
only serve steps). The engine was built with every candidate's shards, so moving between
candidates is the re-sharding machinery's ``Engine.use_plan``: a barrier, the new layout's
groups and stage, a new scheduler. Sequences in flight keep every token they have and
recompute their KV under the next candidate; nothing is lost or produced twice, and every
trial token is part of the job's output.

Each candidate's window is its prefill steps plus ``decode_steps`` measured decode steps (after
one that is not measured: a layout's first decode step carries one-time costs; at most
``4 x decode_steps`` steps) over the job's first sequences: at most ``max_seqs`` and about
one prefill step of prompt tokens, since each move recomputes what they hold. A
``generate`` call that ends inside the trial leaves it where it was; the next call goes on.

For every step the cost model predicts how long that very step (its replicas' sequences,
tokens and contexts) should take; measured over predicted, per phase, is the candidate's
calibration factor. The candidate's throughput on the job's workload is the model's
prediction with each phase's rate divided by its factor.
The model's favourite runs last, so that when it wins the job goes on without another move.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from seesaw_mcore.config import EngineConfig, ParallelConfig, PhasePlan
from seesaw_mcore.contract import Phase, Step
from seesaw_mcore.engine.driver import RunDriver
from seesaw_mcore.engine.stats import StepTiming
from seesaw_mcore.planner.auto import auto_candidates
from seesaw_mcore.planner.cost_model import CostModel
from seesaw_mcore.planner.workload import Workload, workload
from seesaw_mcore.runtime.reshard import internal_moves

log = logging.getLogger("seesaw_mcore")


@dataclass
class Candidate:
    """One plan of the trial and what was measured on it."""

    plan: PhasePlan
    predicted: dict  # the cost model's row
    steps: int = 0
    prefill: list[float] = field(default_factory=lambda: [0.0, 0.0])  # measured, predicted s
    decode: list[float] = field(default_factory=lambda: [0.0, 0.0])
    decode_steps: int = 0
    measured: dict | None = None  # the calibrated row, once its window is over

    def factor(self, phase: Phase) -> float:
        """Measured over predicted seconds of this phase's steps (1 when none ran)."""
        meas, pred = self.prefill if phase == Phase.PREFILL else self.decode
        return meas / pred if pred > 0 and meas > 0 else 1.0

    def summary(self) -> dict:
        return {"plan": self.plan.to_string(),
                "predicted_tokens_per_s": round(self.predicted["tokens_per_s"], 1),
                "measured_tokens_per_s": (round(self.measured["tokens_per_s"], 1)
                                          if self.measured else None),
                "prefill_factor": round(self.factor(Phase.PREFILL), 3),
                "decode_factor": round(self.factor(Phase.DECODE), 3),
                "steps": self.steps, "decode_steps": self.decode_steps}


class PlanTrial:
    """The trial's state and choice, on rank 0 (``TrialDriver`` runs it from
    ``LLM.generate``).

    Args:
        model: the cost model the candidates were ranked with.
        wl: the workload they were ranked for.
        rows: the candidates' rows, best predicted first.
        decode_steps: decode steps each candidate is measured on (it runs one more first).
        max_seqs: sequences the trial admits (its sequences are the job's first ones).
        max_tokens: prompt tokens the trial admits (at least one sequence): one prefill
            step's worth keeps what a move recomputes small.
    """

    def __init__(self, model: CostModel, wl: Workload, rows: list[dict], decode_steps: int = 8,
                 max_seqs: int = 16, max_tokens: int = 4096) -> None:
        self.model, self.wl = model, wl
        self.decode_steps, self.max_seqs, self.max_tokens = decode_steps, max_seqs, max_tokens
        plans = [Candidate(PhasePlan.parse(r["prefill"], r["decode"]), r) for r in rows]
        self.candidates = plans[1:] + plans[:1]  # the model's favourite last
        self._next = 0
        self.current: Candidate | None = None
        self.chosen: Candidate | None = None
        self.added = self.tokens = 0

    @property
    def done(self) -> bool:
        return self.chosen is not None

    def room(self) -> bool:
        """Whether the run may add another sequence while the trial lasts."""
        return self.done or (self.added < self.max_seqs
                             and (self.added == 0 or self.tokens < self.max_tokens))

    def add(self, seq) -> None:
        """Counts a sequence the run added during the trial."""
        self.added += 1
        self.tokens += len(seq.prompt_token_ids)

    def before_step(self, engine) -> None:
        """Moves to the next candidate when the current one's window is over (the first
        call starts the first), and after the last one moves to the fastest."""
        cur = self.current
        if (cur is not None and cur.decode_steps < self.decode_steps + 1
                and cur.steps < 4 * self.decode_steps):
            return
        if cur is not None:
            self._finish(cur)
        if self._next < len(self.candidates):
            self.current = self.candidates[self._next]
            self._next += 1
            if self.current.plan != engine.plan:
                engine.use_plan(self.current.plan)
            return
        self._choose(engine)

    def conclude(self, engine) -> None:
        """Ends the trial now (its sequences finished before every window was over): the
        candidates measured so far decide."""
        if self.current is not None and self.current.steps:
            self._finish(self.current)
        self._choose(engine)

    def _choose(self, engine) -> None:
        self.current = None
        measured = [c for c in self.candidates if c.measured is not None]
        if not measured:  # nothing ran: the model's pick
            self.chosen = self.candidates[-1]
        else:
            self.chosen = max(measured, key=lambda c: c.measured["tokens_per_s"])
        if self.chosen.plan != engine.plan:
            engine.use_plan(self.chosen.plan)
        log.info("plan=auto trial: continuing on %s (%d of %d candidates measured; the "
                 "model's pick was %s)", self.chosen.plan, len(measured),
                 len(self.candidates), self.candidates[-1].plan)

    def observe(self, timing: StepTiming | None) -> None:
        """Adds the step rank 0 just ran to the current candidate."""
        cur = self.current
        if cur is None or timing is None or timing.switch:
            return
        cur.steps += 1
        if timing.phase == Phase.DECODE:
            cur.decode_steps += 1
            if cur.decode_steps == 1:  # the layout's first decode step carries one-time costs
                return
        predicted = self._predict(timing.step, cur.plan)
        acc = cur.prefill if timing.phase == Phase.PREFILL else cur.decode
        acc[0] += timing.seconds
        acc[1] += predicted

    def pause(self) -> None:
        """Logs where a run that ended inside the trial left it."""
        measured = sum(c.measured is not None for c in self.candidates)
        log.info("plan=auto trial: the run ended during the trial (%d of %d candidates "
                 "measured); it ran on %s, and the next run goes on with the trial", measured,
                 len(self.candidates), self.current.plan if self.current else "-")

    def _predict(self, step: Step, plan: PhasePlan) -> float:
        """The cost model's seconds for this step: its slowest replica's."""
        worst = 0.0
        for rep in step.replicas:
            if rep is None or not rep.seqs:
                continue
            prefill = rep.phase == Phase.PREFILL
            lay: ParallelConfig = plan.prefill if prefill else plan.decode
            seqs = rep.seqs
            n, tokens = len(seqs), rep.num_tokens
            ctx = sum(s.start_pos + len(s.token_ids) for s in seqs) / n
            mbs = max(len(rep.micro_batches), 1)
            worst = max(worst, self.model.step_time(lay, mbs, n / mbs, tokens / n, ctx, prefill))
        return worst

    def _finish(self, cand: Candidate) -> None:
        """The candidate's calibrated prediction for the workload, logged beside the model's."""
        m, wl, plan = self.model, self.wl, cand.plan
        row = cand.predicted
        p_tps = m.prefill_tps(plan.prefill, wl) / cand.factor(Phase.PREFILL)
        measured_decode = cand.decode[1] > 0  # the first decode step is not measured
        d_factor = cand.factor(Phase.DECODE if measured_decode else Phase.PREFILL)
        d_tps = row["decode_tokens_per_s"] / d_factor
        cand.measured = m.predict(plan.prefill, plan.decode, wl, p_tps, d_tps) or {
            **row, "tokens_per_s": 0.0}
        if not math.isfinite(cand.measured["tokens_per_s"]):
            cand.measured["tokens_per_s"] = 0.0
        log.info("plan=auto trial: %s predicted %.0f tok/s, measured %.0f tok/s (prefill x%.2f, "
                 "decode x%.2f of the model's step times; %d steps)", plan,
                 row["tokens_per_s"], cand.measured["tokens_per_s"],
                 cand.factor(Phase.PREFILL), d_factor, cand.steps)

    def summary(self) -> dict:
        """What the trial measured and chose (for logs and benchmarks)."""
        return {"candidates": [c.summary() for c in self.candidates],
                "chosen": self.chosen.plan.to_string() if self.chosen else None}


def auto_plans(config: EngineConfig) -> tuple[list[PhasePlan], PlanTrial | None]:
    """``plan=auto``: the plans an engine is built with (the one it starts on first) and,
    when there is more than one candidate, the trial that measures them."""
    model, rows = auto_candidates(config)
    plans = [PhasePlan.parse(r["prefill"], r["decode"]) for r in rows]
    if len(rows) == 1:
        return plans, None
    trial = PlanTrial(model, workload(config.workload), rows, config.auto_trial_steps,
                      config.auto_trial_seqs, config.scheduler.max_prefill_tokens)
    first = trial.candidates[0].plan  # runs first
    return [first, *(p for p in plans if p != first)], trial


class TrialDriver(RunDriver):
    """Drives a ``generate`` call while the trial lasts: admits only the trial's sequences,
    moves to the next candidate before a step when the current one's window is over,
    measures every step, and ends the trial when its sequences are done; after that it
    drives as a plain ``RunDriver``.

    Args:
        engine: the engine, inside its ``session``.
        trial: the trial, not done.
    """

    def __init__(self, engine, trial: PlanTrial) -> None:
        super().__init__(engine)
        self.trial = trial

    def admits(self) -> bool:
        return self.trial.room()

    def add(self, seq) -> None:
        super().add(seq)
        if not self.trial.done:
            self.trial.add(seq)

    def step(self) -> list:
        trial = self.trial
        if not trial.done:  # its moves and switches are the trial's (logged with verbose)
            with internal_moves():
                trial.before_step(self.engine)  # may end the trial (the fastest chosen)
        if trial.done:
            return self.engine.step()
        with internal_moves():  # this step belongs to a candidate's window
            out = self.engine.step()
        trial.observe(self.engine.last_step)
        return out

    def idle(self) -> bool:
        trial = self.trial
        if trial.done:
            return False
        if not trial.room():  # its sequences are done: the candidates so far decide
            with internal_moves():
                trial.conclude(self.engine)
            return True
        trial.pause()
        return False
