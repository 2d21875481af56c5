"""One rank's side of every step message: run this rank's replica's part of a ``Step`` (and
send its sampled tokens to rank 0), re-shard at a ``Switch``, move to another plan at a
``MovePlan``, return at a ``Stop``. Rank 0 runs the same code for its own part (through
``Executor``) and collects every replica's tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from seesaw_mcore import env
from seesaw_mcore.config import ParallelConfig, PhasePlan
from seesaw_mcore.contract import (
    Control,
    ControlKind,
    MovePlan,
    Phase,
    RunnerOutput,
    Step,
    StepMessage,
    Stop,
    Switch,
)
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.runtime import groups
from seesaw_mcore.runtime.model_runner import ModelRunner
from seesaw_mcore.runtime.reshard import Resharder, SwitchRecord
from seesaw_mcore.runtime.step_channel import StepChannel, recv_tokens, send_tokens


class Worker:
    """Runs step messages on this rank; owns the live plan and phase.

    Args:
        runner: this rank's stage and KV cache.
        plan: the plan it starts on (in its prefill layout).
    """

    def __init__(self, runner: ModelRunner, plan: PhasePlan) -> None:
        self.runner, self.plan = runner, plan
        self.phase = Phase.PREFILL
        self.resharder = Resharder(runner)
        self.channel = StepChannel(groups.host_group())  # step messages as tensors, no pickle
        # tests: plans made artificially slow; read at the first step, not per step (the
        # auto-trial test sets it after building the engine, once it knows the candidates)
        self._slow: dict[str, float] | None = None
        # runs a serving loop's ``Control`` commands on this rank (set by ``AsyncLLM``)
        self.on_control: Callable[[Control], None] | None = None

    @property
    def layout(self) -> ParallelConfig:
        """The layout this rank runs now."""
        return self.runner.info.layout

    def run_step(self, step: Step) -> RunnerOutput | None:
        """This rank's replica's part of ``step``.

        Returns:
            The sampled tokens on a replica's last stage (TP rank 0), else ``None``.
        """
        self._mark(step)
        dp = self.runner.info.dp_rank
        mine = step.replicas[dp] if dp < len(step.replicas) else None
        if self._slow is None:
            self._slow = env.fault_slow()
        if self._slow:
            time.sleep(self._slow.get(self.plan.to_string(), 0.0))
        out = self.runner.execute(mine) if mine is not None else None
        ep = self.layout.ep
        if ep > 1 and self.runner.cfg.num_experts:  # MoE exchanges pair up in an E group
            group = range(dp - dp % ep, dp - dp % ep + ep)
            forwards = [len(step.replicas[r].micro_batches)
                        if r < len(step.replicas) and step.replicas[r] is not None else 0
                        for r in group]
            self.runner.model.idle_moe(max(forwards) - forwards[dp % ep])
        return out

    def switch(self, msg: Switch) -> SwitchRecord:
        """Every rank at the same step: re-shards to ``msg.phase``'s layout of the live plan
        (a hand-back's swap-outs run after the barrier)."""
        self._mark(msg)
        dp = self.runner.info.dp_rank
        hand_back = msg.hand_back[dp] if dp < len(msg.hand_back) else None
        record = self.resharder.switch(self._layout_for(msg.phase), msg.phase, hand_back)
        self.phase = msg.phase
        return record

    def move(self, msg: MovePlan) -> SwitchRecord:
        """Every rank at the same step: from now on run ``msg.plan`` (one of the layouts
        the runner was built for), starting in its prefill layout. The scheduler that sent
        this holds no KV of the old plan: every sequence in flight recomputes."""
        self._mark(msg)
        self.plan = PhasePlan.from_string(msg.plan)
        record = self.resharder.switch(self.plan.prefill, Phase.PREFILL)
        self.phase = Phase.PREFILL
        return record

    def _layout_for(self, phase: Phase) -> ParallelConfig:
        """The live plan's layout for ``phase``."""
        return self.plan.prefill if phase == Phase.PREFILL else self.plan.decode

    def collect(self, step: Step, mine: RunnerOutput | None) -> list[RunnerOutput | None]:
        """Rank 0: every replica's sampled tokens (its own, or received from the replica's
        last stage)."""
        lay = self.layout
        outputs: list[RunnerOutput | None] = []
        for r, out in enumerate(step.replicas):
            src = lay.last_stage_rank(r)
            if out is None:
                outputs.append(None)
            elif src == 0:
                outputs.append(mine)
            else:
                outputs.append(recv_tokens(out.seqs, src, groups.host_group(),
                                              self.runner.routes_shape))
        return outputs

    def serve(self) -> None:
        """Ranks other than 0: run rank 0's messages until it says stop (raises rank 0's
        error when it failed)."""
        while True:
            msg = self.channel.recv()
            if isinstance(msg, Stop):
                self._mark(msg)
                if msg.error:
                    raise SeesawError(f"rank 0 failed: {msg.error}")
                return
            if isinstance(msg, Control):
                self.control(msg)
            elif isinstance(msg, Switch):
                self.switch(msg)
            elif isinstance(msg, MovePlan):
                self.move(msg)
            else:
                out = self.run_step(msg)
                if out is not None:
                    mine = msg.replicas[self.runner.info.dp_rank]
                    send_tokens(out, mine.seqs, 0, groups.host_group(),
                                routes=self.runner.routes_shape is not None)

    def control(self, msg: Control) -> None:
        """Every rank: a serving loop's command (rank 0 runs it after sending it)."""
        if msg.kind == ControlKind.KEEPALIVE:
            return
        wd = groups.watchdog()
        if wd is not None:
            wd.set_phase("control", msg.kind.value)
        if self.on_control is None:
            raise SeesawError(f"{msg.kind.value}: this rank runs no serving loop")
        self.on_control(msg)

    def stop(self, error: str | None = None) -> None:
        """Rank 0: ends the workers' ``serve`` (with ``error``: makes it raise that)."""
        self.channel.send(Stop(error))

    def _mark(self, msg: StepMessage) -> None:
        """Tells the watchdog what the job is doing (named if a rank fails meanwhile)."""
        wd = groups.watchdog()
        if wd is None:
            return
        if isinstance(msg, Stop):
            wd.set_phase("end", "the end of the run")
        elif isinstance(msg, MovePlan):
            wd.set_phase("switch", f"the move from plan {self.plan} to {msg.plan}")
        elif isinstance(msg, Switch):  # called before the switch: the live layout is its source
            wd.set_phase("switch", f"the switch {self.layout} -> "
                         f"{self._layout_for(msg.phase)} ({msg.phase.value})")
        else:
            kind = msg.phase.value
            wd.set_phase(kind, kind)
