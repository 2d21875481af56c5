"""One rank's side of every step: receive the step plan, run this rank's replica's part of it
(or the switch), send sampled tokens to rank 0. Rank 0 runs the same code for its own part
(``Engine.step``) and collects every replica's tokens.
"""

from __future__ import annotations

import time

from seesaw_mcore import env
from seesaw_mcore.config import PhasePlan
from seesaw_mcore.contract import Phase, RunnerOutput, StepPlan
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.runtime import groups
from seesaw_mcore.runtime.model_runner import ModelRunner
from seesaw_mcore.runtime.reshard import Resharder, SwitchRecord
from seesaw_mcore.runtime.step_channel import StepChannel, recv_tokens, send_tokens


class Worker:
    """Runs step plans on this rank.

    Args:
        runner: this rank's stage and KV cache.
        plan: the prefill and decode layouts.
    """

    def __init__(self, runner: ModelRunner, plan: PhasePlan) -> None:
        self.runner, self.plan = runner, plan
        self.phase = Phase.PREFILL
        self.resharder = Resharder(runner, plan)
        self.channel = StepChannel(groups.host_group())  # step plans as tensors, no pickle

    def execute(self, step: StepPlan) -> RunnerOutput | SwitchRecord | None:
        """This rank's part of ``step``: the switch, or its replica's forward.

        Returns:
            The switch's record; the sampled tokens on a replica's last stage (TP rank 0);
            else ``None``.
        """
        self.mark_phase(step)
        if step.use_plan is not None:
            return self.use_plan(PhasePlan.from_string(step.use_plan))
        dp = self.runner.info.dp_rank
        mine = step.replicas[dp] if dp < len(step.replicas) else None
        if step.switch_to is not None:  # a hand-back's swap-outs run after the barrier
            record = self.resharder.switch(step.switch_to, mine)
            self.phase = step.switch_to
            return record
        slow = env.fault_slow()
        if slow:  # tests: a plan made artificially slow
            time.sleep(slow.get(self.plan.to_string(), 0.0))
        out = self.runner.execute(mine) if mine is not None else None
        ep = self.runner.info.layout.ep
        if ep > 1 and self.runner.cfg.num_experts:  # MoE exchanges pair up in an E group
            group = range(dp - dp % ep, dp - dp % ep + ep)
            forwards = [len(step.replicas[r].micro_batches)
                        if r < len(step.replicas) and step.replicas[r] is not None else 0
                        for r in group]
            self.runner.idle_moe(max(forwards) - forwards[dp % ep])
        return out

    def use_plan(self, plan: PhasePlan) -> SwitchRecord:
        """Every rank at the same step: from now on run ``plan`` (one of the layouts the
        runner was built for), starting in its prefill layout. The scheduler that sent this
        holds no KV of the old plan: every sequence in flight recomputes."""
        self.plan = self.resharder.plan = plan
        record = self.resharder.switch(Phase.PREFILL)
        self.phase = Phase.PREFILL
        return record

    def collect(self, step: StepPlan, mine: RunnerOutput | None) -> list[RunnerOutput | None]:
        """Rank 0: every replica's sampled tokens (its own, or received from the replica's
        last stage)."""
        lay = self.runner.info.layout
        outputs: list[RunnerOutput | None] = []
        for r, plan in enumerate(step.replicas):
            src = lay.rank_of(r, 0, lay.pp - 1)
            if plan is None:
                outputs.append(None)
            elif src == 0:
                outputs.append(mine)
            else:
                outputs.append(recv_tokens(plan.seqs, src, groups.host_group()))
        return outputs

    def serve(self) -> None:
        """Ranks other than 0: run steps until rank 0 says stop (raises rank 0's error when
        it failed)."""
        while True:
            step = self.channel.recv()
            if step.stop:
                self.mark_phase(step)
                if step.error:
                    raise SeesawError(f"rank 0 failed: {step.error}")
                return
            out = self.execute(step)
            if isinstance(out, RunnerOutput):
                mine = step.replicas[self.runner.info.dp_rank]
                send_tokens(out, mine.seqs, 0, groups.host_group())

    def stop(self, error: str | None = None) -> None:
        """Rank 0: ends the workers' ``serve`` (with ``error``: makes it raise that)."""
        self.channel.send(StepPlan([], stop=True, error=error))

    def step_phase(self, step: StepPlan) -> Phase:
        """The phase a step runs in (a switch: the phase it switches to)."""
        if step.use_plan is not None:
            return Phase.PREFILL
        if step.switch_to is not None:
            return step.switch_to
        reps = [r for r in step.replicas if r is not None]
        return reps[0].phase if reps else self.phase

    def mark_phase(self, step: StepPlan) -> None:
        """Tells the watchdog what the job is doing (named if a rank fails meanwhile)."""
        wd = groups.watchdog()
        if wd is None:
            return
        if step.stop:
            wd.set_phase("end", "the end of the run")
        elif step.use_plan is not None:
            wd.set_phase("switch", f"the move from plan {self.plan} to {step.use_plan}")
        elif step.switch_to is not None:
            src, dst = ((self.plan.decode, self.plan.prefill)
                        if step.switch_to == Phase.PREFILL
                        else (self.plan.prefill, self.plan.decode))
            wd.set_phase("switch", f"the switch {src} -> {dst} ({step.switch_to.value})")
        else:
            kind = self.step_phase(step).value
            wd.set_phase(kind, kind)
