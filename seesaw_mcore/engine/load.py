"""What a serving engine holds at a moment (``EngineLoad``) and what it has served
(``RequestCounters``): the numbers ``/metrics`` and the load tests read."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from seesaw_mcore.engine.request import RequestOutput


@dataclass(frozen=True)
class EngineLoad:
    """A snapshot taken between two steps on rank 0.

    Attributes:
        requests: requests in flight or queued.
        queued: of those, requests no sample of which the scheduler has yet.
        running: sequences the scheduler holds that are not waiting for prefill.
        waiting: sequences waiting for prefill (new or preempted) or queued.
        kv_usage: share of the active layout's device KV blocks in use (0..1).
        tier_usage: the KV tiers' load (Seesaw plans), else ``None``.
        prefix_queried / prefix_hit: (re)prefill tokens looked up in the prefix cache and
            found there, over the engine's life.
        switches: phase switches so far; phase: the phase the ranks are in.
        preemptions: preemptions so far.
        paused / asleep: generation paused, memory released.
    """

    requests: int
    queued: int
    running: int
    waiting: int
    kv_usage: float
    tier_usage: float | None
    prefix_queried: int
    prefix_hit: int
    switches: int
    phase: str
    preemptions: int
    paused: bool
    asleep: bool


def engine_load(engine, loop) -> EngineLoad:
    """``EngineLoad`` of ``engine`` turned by ``loop`` (an ``EngineLoop``; its thread)."""
    sched, st = engine.scheduler, engine.stats
    queued = [r for r in loop.pending if r.admitted == 0]
    queued_seqs = sum(len(r.samples) - r.admitted for r in loop.pending)
    unfinished = engine.num_unfinished
    waiting = sched.num_waiting if sched is not None else 0
    queried = st.prefill_tokens + (sched.prefix.queried if sched is not None else 0)
    hit = st.cached_tokens + (sched.prefix.hit if sched is not None else 0)
    preempt = st.preemptions + (sched.num_preemptions if sched is not None else 0)
    return EngineLoad(
        requests=loop.num_requests, queued=len(queued), running=unfinished - waiting,
        waiting=waiting + queued_seqs,
        kv_usage=sched.kv_usage() if sched is not None else 0.0,
        tier_usage=sched.tier_usage() if sched is not None else None,
        prefix_queried=queried, prefix_hit=hit,
        switches=st.switches, phase=engine.executor.phase.value, preemptions=preempt,
        paused=loop.paused is not None, asleep=engine.asleep)


class RequestCounters:
    """Requests finished and their tokens, counted as final outputs pass (any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.aborted = 0

    def finished(self, out: RequestOutput) -> None:
        with self._lock:
            self.requests += 1
            self.prompt_tokens += len(out.prompt_token_ids)
            self.generation_tokens += sum(len(c.token_ids) for c in out.outputs)
            self.aborted += any(c.finish_reason == "abort" for c in out.outputs)
