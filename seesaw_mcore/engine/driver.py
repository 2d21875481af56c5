"""What ``LLM.generate``'s loop drives on rank 0: it admits sequences and steps the engine
through a ``RunDriver``. The plain driver passes both straight to the engine;
``plan=auto``'s trial (``planner/trial.py``) is a driver that also limits what is admitted,
measures each step and moves between plans, so the loop holds no trial code.
"""

from __future__ import annotations

from seesaw_mcore.engine.engine import Engine
from seesaw_mcore.engine.request import Sequence


class RunDriver:
    """Admits sequences and runs steps of one ``generate`` call.

    Args:
        engine: the engine, inside its ``session``.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def admits(self) -> bool:
        """Whether the loop may add another sequence now."""
        return True

    def add(self, seq: Sequence) -> None:
        self.engine.add(seq)

    def step(self) -> list[Sequence]:
        """One engine step (see ``Engine.step``)."""
        return self.engine.step()

    def idle(self) -> bool:
        """The engine has nothing left to run: whether the loop should go on (admit more)
        rather than end the call."""
        return False
