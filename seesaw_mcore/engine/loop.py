"""The one engine loop on rank 0: requests arrive, stream out, leave and pause between steps.

``EngineLoop`` owns everything a step's outcome touches on rank 0: the requests admitted and
waiting to be, the output processor (detokenization, stop strings), each request's output
sink, abort and pause. One turn (``iterate``) admits what the scheduler has room for, runs
one engine step (or switch) and hands every request its outputs: each step's
(``RequestOutputKind.CUMULATIVE`` or ``DELTA``) or only the final one (``FINAL_ONLY``).
``LLM.generate`` turns it inline until its prompts are done; ``AsyncLLM`` turns it on a
thread of its own, forever, with commands (abort, pause, weight updates, sleep) run between
turns. Nothing here is thread-safe: one thread turns the loop and calls its methods.

Pause modes (vLLM's and SGLang's, what RL frameworks call between rollouts):

- ``abort``: every request in flight or queued ends now with what it has
  (``finish_reason`` "abort"); new requests wait for ``resume``.
- ``wait``: nothing new is admitted; the requests in flight run to their end, then the loop
  is paused.
- ``keep``: no step runs; requests in flight keep their KV where it is (device blocks, tier
  slots) and continue from it after ``resume`` - with the new weights if they were updated
  meanwhile. A ``sleep`` while paused frees the device KV: the requests on the device are
  recomputed after the wake-up (their tokens are kept).
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from seesaw_mcore.engine.adapters import AdaptersBusy
from seesaw_mcore.engine.driver import RunDriver
from seesaw_mcore.engine.engine import Engine
from seesaw_mcore.engine.output import OutputProcessor
from seesaw_mcore.engine.request import CompletionOutput, RequestOutput, Sequence
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.sampling_params import RequestOutputKind


class PauseMode(str, enum.Enum):
    """How ``EngineLoop.pause`` treats the requests in flight (see the module doc)."""

    ABORT = "abort"
    WAIT = "wait"
    KEEP = "keep"


@dataclass(eq=False)
class LoopRequest:
    """A request as the loop takes it: validated, its samples made.

    Attributes:
        index: unique within the loop (output order of ``LLM.generate``; DP routing).
        request_id: the caller's id (unique among requests in flight).
        prompt: its text, if it came as text.
        prompt_token_ids: its tokens.
        samples: its ``n`` sequences.
        sink: called with each output the request's ``kind`` asks for.
        kind: which outputs go to ``sink``.
        arrival: ``time.perf_counter()`` when it arrived.
    """

    index: int
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[Sequence]
    sink: Callable[[RequestOutput], None]
    kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY
    arrival: float = field(default_factory=time.perf_counter)
    admitted: int = 0  # samples handed to the engine so far
    sent_tokens: list[int] = field(default_factory=list)  # DELTA: per sample, tokens sent
    sent_text: list[int] = field(default_factory=list)  # DELTA: per sample, chars sent
    sent_prompt_logprobs: bool = False
    lora: object = None  # its LoRARequest (None: the base model), loaded at admission


class EngineLoop:
    """Requests in and outputs out around ``Engine.step`` (see the module doc).

    Args:
        engine: the engine; its ``session`` is open while the loop turns.
        tokenizer: for output text (``None``: token ids only).
        driver: admits and steps (``RunDriver``; ``plan=auto``'s ``TrialDriver``).
        source: requests pulled lazily as the scheduler has room, after those submitted
            (``LLM.generate``'s prompts).
    """

    def __init__(self, engine: Engine, tokenizer, driver: RunDriver | None = None,
                 source: Iterator[LoopRequest] | None = None) -> None:
        self.engine = engine
        self.processor = OutputProcessor(tokenizer)
        self.driver = driver or RunDriver(engine)
        self.source = source
        self._pending: deque[LoopRequest] = deque()  # submitted, not (wholly) admitted
        self._live: dict[str, LoopRequest] = {}  # submitted and not finished, by id
        self._by_index: dict[int, LoopRequest] = {}
        self.paused: PauseMode | None = None
        self._draining = False  # pause(WAIT) asked: no admissions until the batch is done

    # -- requests ---------------------------------------------------------------------

    def submit(self, req: LoopRequest) -> None:
        """Queues a request (admitted at the next turn with room).

        Raises:
            SeesawError: its id is already in flight.
        """
        if req.request_id in self._live:
            raise SeesawError(f"request id {req.request_id!r} is already in flight")
        self._pending.append(req)
        self._track(req)

    def abort(self, request_id: str) -> bool:
        """Ends a request in any state (queued, waiting, running, in a tier): its samples
        stop with what they have (``finish_reason`` "abort"), every block and tier slot they
        hold is freed, and its sink gets the final output. Returns whether it was in flight.
        """
        req = self._live.get(request_id)
        if req is None:
            return False
        if req in self._pending:
            self._pending.remove(req)
        if req.admitted == 0:  # the processor has not seen it yet
            self._open(req)
        for seq in req.samples[:req.admitted]:
            if seq.finish_reason is None:
                self.engine.abort(seq)
        self._deliver(req, self.processor.abort(req.index))
        return True

    def abort_all(self) -> int:
        """Aborts every request in flight or queued; returns how many."""
        ids = list(self._live)
        for rid in ids:
            self.abort(rid)
        return len(ids)

    @property
    def num_requests(self) -> int:
        """Requests in flight or queued."""
        return len(self._live)

    @property
    def num_pending(self) -> int:
        """Submitted requests not yet wholly handed to the engine (any thread: a read)."""
        return len(self._pending)

    @property
    def pending(self) -> tuple[LoopRequest, ...]:
        """Submitted requests not yet wholly handed to the engine, oldest first."""
        return tuple(self._pending)

    # -- pause ------------------------------------------------------------------------

    def pause(self, mode: PauseMode | str) -> None:
        """Pauses generation (see the module doc); ``WAIT`` pauses once the batch in flight
        is done (``paused`` is set then)."""
        try:
            mode = PauseMode(mode)
        except ValueError:
            raise SeesawError(f"pause mode must be one of {[m.value for m in PauseMode]}, "
                              f"got {mode!r}") from None
        if mode == PauseMode.ABORT:
            self.abort_all()
            self.paused = mode
        elif mode == PauseMode.KEEP:
            self.paused = mode
        elif not self.engine.has_unfinished():
            self.paused = mode
        else:
            self._draining = True

    def resume(self) -> None:
        """Generation goes on: queued requests are admitted, kept ones continue."""
        self.paused, self._draining = None, False

    # -- turning ----------------------------------------------------------------------

    def iterate(self) -> bool:
        """One turn: admit what fits, run one step and hand out its outputs.

        Returns:
            Whether the loop made progress (ran a step or switch, or the driver asks for
            another turn); ``False``: nothing to run now (idle, paused or asleep).
        """
        if self.paused is not None or self.engine.asleep:
            return False
        if not self._draining:
            self._admit()
        engine = self.engine
        if not engine.has_unfinished():
            if self._draining:  # pause(WAIT): the batch is done
                self.paused, self._draining = PauseMode.WAIT, False
                return False
            return self.driver.idle()
        seqs = self.driver.step()
        stopped, finished = self.processor.process(seqs)
        for seq in stopped:
            engine.finish(seq)
        touched: dict[int, LoopRequest] = {}
        for seq in seqs:
            req = self._by_index.get(seq.request_index)
            if req is not None and req.kind != RequestOutputKind.FINAL_ONLY:
                touched[req.index] = req
        done = set()
        for index, out in finished:
            done.add(index)
            self._deliver(self._by_index[index], out)
        for index, req in touched.items():
            if index not in done:
                self._deliver(req, self.processor.snapshot(index), final=False)
        return True

    def _admit(self) -> None:
        """Hands samples to the engine while its waiting queue is short of a lookahead and
        the driver admits: submitted requests first, then the source's."""
        engine, driver = self.engine, self.driver
        while engine.num_waiting < engine.lookahead and driver.admits():
            if not self._pending:
                nxt = next(self.source, None) if self.source is not None else None
                if nxt is None:
                    return
                self._pending.append(nxt)
                self._track(nxt)
            req = self._pending[0]
            if req.admitted == 0:
                if req.lora is not None:
                    try:  # loaded now, on every rank, unless it is resident
                        adapter = engine.use_lora(req.lora)
                    except AdaptersBusy:  # every index runs sequences: wait for one
                        return
                    for seq in req.samples:
                        seq.lora, seq.lora_key = adapter.index, adapter.key
                self._open(req)
            driver.add(req.samples[req.admitted])
            req.admitted += 1
            if req.admitted == len(req.samples):
                self._pending.popleft()

    def _open(self, req: LoopRequest) -> None:
        """The output processor takes the request (at its first admission, or its abort)."""
        self.processor.add_request(req.index, req.request_id, req.prompt,
                                   req.prompt_token_ids, req.samples, req.arrival)

    def _track(self, req: LoopRequest) -> None:
        self._live[req.request_id] = req
        self._by_index[req.index] = req
        req.sent_tokens = [0] * len(req.samples)
        req.sent_text = [0] * len(req.samples)

    def _deliver(self, req: LoopRequest, out: RequestOutput, final: bool = True) -> None:
        """Hands ``out`` to the request's sink as its kind asks; a final output ends it."""
        if final:
            self._live.pop(req.request_id, None)
            self._by_index.pop(req.index, None)
        if req.kind == RequestOutputKind.DELTA:
            out = self._delta(req, out)
        req.sink(out)

    @staticmethod
    def _delta(req: LoopRequest, out: RequestOutput) -> RequestOutput:
        """``out`` cut to what the request has not been sent yet."""
        outs = []
        for c in out.outputs:
            k = c.index
            t0, x0 = req.sent_tokens[k], req.sent_text[k]
            req.sent_tokens[k], req.sent_text[k] = len(c.token_ids), len(c.text)
            outs.append(CompletionOutput(
                index=k, text=c.text[x0:], token_ids=c.token_ids[t0:],
                cumulative_logprob=c.cumulative_logprob,
                logprobs=None if c.logprobs is None else c.logprobs[t0:],
                finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                num_preemptions=c.num_preemptions, routed_experts=c.routed_experts))
        prompt_lp = None if req.sent_prompt_logprobs else out.prompt_logprobs
        req.sent_prompt_logprobs = True
        return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, prompt_lp,
                             outs, out.finished, out.num_cached_tokens, out.latency_s)
