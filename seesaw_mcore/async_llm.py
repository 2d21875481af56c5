"""vLLM's ``AsyncLLM`` surface over this engine: requests that arrive, stream, leave and pause
while the engine runs (what RL frameworks' rollout workers and serving front-ends drive).

    llm = AsyncLLM(model="DIR", plan="P2:T2")
    async for out in llm.generate("Hello", SamplingParams(max_tokens=64), "req-1"):
        ...                               # RequestOutput per step (output_kind), then final
    await llm.abort("req-1")
    await llm.pause_generation(mode="keep"); await llm.update_weights(pairs)
    await llm.resume_generation()
    llm.shutdown()

The engine loop (``engine/loop.py``, the same one ``LLM.generate`` turns) runs on a thread of
rank 0; the asyncio side only queues commands to it and reads per-request output queues, so
every engine call happens between two steps on one thread. New requests join the running
batch at the next step, on every plan. Commands that every rank must run (weight updates,
sleep, wake-up, joining a trainer's update group) travel to the other ranks as ``Control``
step messages; while idle the loop sends a keep-alive so the other ranks' wait never reaches
the collective timeout.

SPMD under a launcher: every rank constructs ``AsyncLLM``; on ranks other than 0 the
constructor follows rank 0's engine until rank 0 shuts down, then returns (``is_driver``
False). With one rank it runs in a plain ``python`` process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from seesaw_mcore.contract import Control, ControlKind
from seesaw_mcore.engine.adapters import LORA_CONTROLS
from seesaw_mcore.engine.load import EngineLoad, RequestCounters, engine_load
from seesaw_mcore.engine.loop import EngineLoop
from seesaw_mcore.engine.loop_thread import LoopThread
from seesaw_mcore.engine.request import RequestOutput
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.io.requests import PromptType
from seesaw_mcore.llm import LLM
from seesaw_mcore.model.lora import LoRARequest
from seesaw_mcore.model.weight_update import check_update
from seesaw_mcore.runtime import groups
from seesaw_mcore.sampling_params import SamplingParams


class EngineDeadError(SeesawError):
    """The engine loop failed; this engine takes no more requests (vLLM's name)."""


class AsyncLLM:
    """An engine that takes requests one by one while it runs (see the module doc).

    Args:
        model: local HF model folder (safetensors).
        config: a whole ``EngineConfig`` instead of keyword arguments.
        **kwargs: ``EngineConfig`` fields by name, as ``LLM`` takes them (``plan="auto"``
            is refused: its trial measures a batch it knows up front).
    """

    def __init__(self, model: str | None = None, config=None, **kwargs: Any) -> None:
        if kwargs.get("plan") == "auto" or (config is not None and config.is_auto):
            raise SeesawError("plan=auto needs a batch known up front: use LLM, or name a plan")
        self._llm = LLM(model, config, **kwargs)
        self.engine = self._llm.engine
        self.tokenizer = self._llm.tokenizer
        self._payload: list | None = None  # rank 0: the pairs an UPDATE_WEIGHTS sends
        self.engine.executor.worker.on_control = self._on_control
        self._closed = False
        self._error: BaseException | None = None
        if not self.is_driver:  # follow rank 0's engine until it closes
            try:
                self.engine.serve()
            finally:
                self._close_engine()
            return
        self._loop = EngineLoop(self.engine, self.tokenizer)
        self._streams: dict[str, Callable[[RequestOutput | BaseException], None]] = {}
        self._indices = itertools.count()
        self.counters = RequestCounters()
        self._next_seq = 0  # the next request's first sequence id
        timeout = self.engine.config.runtime.dist_timeout_s
        self._outbox = Outbox()
        self._thread = LoopThread(self.engine, self._loop, groups.device(),
                                  max(1.0, min(30.0, timeout / 4)), self._fail,
                                  self._outbox.flush)
        self._thread.start()

    # -- facts ------------------------------------------------------------------------

    @property
    def is_driver(self) -> bool:
        return self.engine.is_driver

    @property
    def error(self) -> BaseException | None:
        """Why the engine loop failed (``None`` while it runs)."""
        return self._error

    @property
    def errored(self) -> bool:
        """Whether the engine loop failed (then every call raises ``EngineDeadError``)."""
        return self._error is not None

    @property
    def is_running(self) -> bool:
        return self.is_driver and not self._closed and self._error is None

    async def get_tokenizer(self):
        """The model's transformers tokenizer (``None`` when the folder has none)."""
        return self.tokenizer

    async def is_paused(self) -> bool:
        return await self._call(lambda: self._loop.paused is not None)

    @property
    def num_requests(self) -> int:
        """Requests in flight or queued (read without a lock: a snapshot)."""
        return self._loop.num_requests

    @property
    def num_queued(self) -> int:
        """Requests queued and not yet handed to the engine (a snapshot, as above)."""
        return self._loop.num_pending

    async def abort_all(self) -> int:
        """Aborts every request in flight or queued; returns how many."""
        return await self._call(self._loop.abort_all)

    # -- requests ---------------------------------------------------------------------

    async def generate(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, lora_request: LoRARequest | None = None
                       ) -> AsyncIterator[RequestOutput]:
        """Generates one request, yielding its ``RequestOutput``s as
        ``sampling_params.output_kind`` asks (each step's, cumulative or delta, or only the
        final one); the last has ``finished`` True. A bad request raises a one-line
        ``SeesawError`` for this request only; leaving the iteration early (a dropped caller)
        aborts it.

        Args:
            prompt: a string or ``{"prompt_token_ids": [...]}`` (``"prompt"``: its text).
            sampling_params: vLLM's (default ``SamplingParams()``).
            request_id: unique among requests in flight (default: a fresh number).
            lora_request: the LoRA adapter it runs under (loaded when the request is
                admitted, if it is not; ``None``: the base model).
        """
        stream = await self.add_request(prompt, sampling_params, request_id, lora_request)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    async def add_request(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                          request_id: str | None = None, lora_request: LoRARequest | None = None
                          ) -> RequestStream:
        """``generate`` in two halves: checks and queues the request now (a bad one raises
        here, nothing queued) and returns its stream of outputs, which the caller must
        ``close`` (it aborts the request if it has not finished). What a server needs to
        refuse a request before it starts its response."""
        self._check_alive()
        params = sampling_params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise SeesawError(f"sampling_params must be a SamplingParams, got "
                              f"{type(params).__name__}")
        if lora_request is not None and not isinstance(lora_request, LoRARequest):
            raise SeesawError(f"lora_request must be a LoRARequest or None, got "
                              f"{type(lora_request).__name__}")
        if lora_request is not None and self.engine.adapters is None:
            raise SeesawError("lora_request needs AsyncLLM(enable_lora=True)")
        index = next(self._indices)
        rid = str(index) if request_id is None else str(request_id)
        outputs: asyncio.Queue = asyncio.Queue()
        aloop = asyncio.get_running_loop()
        counts = self.counters

        def sink(out) -> None:  # the engine thread's side
            if isinstance(out, BaseException) or out.finished:
                self._streams.pop(rid, None)
                if not isinstance(out, BaseException):
                    counts.finished(out)
            self._outbox.put(aloop, outputs, out)

        req = self._llm.loop_request(index, rid, prompt, params, self._next_seq,
                                     f"request {rid!r}", sink, time.perf_counter(),
                                     params.output_kind, lora_request)
        self._next_seq += params.n

        def submit() -> None:
            self._loop.submit(req)
            self._streams[rid] = sink

        await self._call(submit)  # (a duplicate id raises here: nothing to abort)
        return RequestStream(self, rid, outputs)

    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Loads a LoRA adapter on every rank (vLLM's ``add_lora``; a bad adapter is a
        one-line error, nothing loaded). Returns ``True``."""
        if self.engine.adapters is None:
            raise SeesawError("add_lora needs AsyncLLM(enable_lora=True)")
        await self._call(lambda: self.engine.use_lora(lora_request))
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        """Unloads adapter ``lora_id`` on every rank (refused while requests use it);
        ``False`` when it is not loaded (never, or evicted since)."""
        if self.engine.adapters is None:
            raise SeesawError("remove_lora needs AsyncLLM(enable_lora=True)")

        def unload() -> bool:
            if lora_id not in self.engine.adapters.resident:
                return False
            self.engine.adapters.check_remove(lora_id, self._busy_loras())
            self.engine.executor.control(Control(ControlKind.UNLOAD_LORA,
                                                 json.dumps({"lora_int_id": lora_id})))
            return True

        return await self._call(unload)

    async def list_loras(self) -> set[int]:
        """The ids of the adapters loaded."""
        return set(self.engine.adapters.resident) if self.engine.adapters else set()

    def _busy_loras(self) -> list[int]:
        """Engine thread: the ids of adapters sequences in flight run under."""
        return self.engine.adapters.busy(s.lora for s in self.engine.sequences())

    async def abort(self, request_id: str | Iterable[str]) -> None:
        """Ends requests in any state: each stops with what it has (``finish_reason``
        "abort", its stream's last output), every block and tier slot freed. Unknown or
        finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        await self._call(lambda: [self._loop.abort(r) for r in ids])

    # -- pause, weights, memory -------------------------------------------------------

    async def pause_generation(self, mode: str = "abort", clear_cache: bool = False) -> None:
        """Pauses generation (``mode``: ``abort`` ends requests in flight now with what they
        have; ``wait`` lets them finish, returning once they have; ``keep`` freezes them,
        their KV kept, to continue after ``resume_generation``). New requests wait. Weight
        updates, sleep / wake-up and ``reset_prefix_cache`` may run while paused.
        ``clear_cache``: also forget the prefix cache."""
        def pause() -> concurrent.futures.Future:
            self._loop.pause(mode)
            if clear_cache:
                self.engine.reset_prefix_cache()
            return self._thread.when_paused()

        await asyncio.wrap_future(await self._call(pause))

    async def resume_generation(self) -> None:
        """Generation goes on: kept requests continue, queued ones are admitted."""
        await self._call(self._loop.resume)

    async def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (blocks in use stay in use)."""
        await self._call(self.engine.reset_prefix_cache)

    async def load(self) -> EngineLoad:
        """What the engine holds now (``EngineLoad``), read between two steps."""
        return await self._call(lambda: engine_load(self.engine, self._loop))

    async def update_weights_from_disk(self, path: str) -> None:
        """Every rank reads new weights from a checkpoint folder (HF safetensors or a
        Megatron checkpoint of the same model) and takes them in place between two steps,
        like ``update_weights``; a folder of another model is a one-line error, nothing
        written."""
        await self._control(ControlKind.LOAD_WEIGHTS, {"path": path})

    async def update_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Takes new weights in place between two steps, like ``LLM.update_weights`` (HF
        names, full tensors; checked first: a bad pair is a one-line error, nothing
        written); requests in flight continue with them; the prefix cache is forgotten."""
        pairs = [(n, t.detach().cpu() if isinstance(t, torch.Tensor) else t)
                 for n, t in weights]
        check_update(self.engine.model_cfg, pairs)

        def update() -> None:
            self._payload = pairs
            try:
                self.engine.executor.control(Control(ControlKind.UPDATE_WEIGHTS))
            finally:
                self._payload = None

        await self._call(update)

    async def init_weight_update_group(self, master_address: str, master_port: int,
                                       rank_offset: int, world_size: int) -> None:
        """Every rank joins a trainer's weight-update group (``LLM``'s)."""
        args = dict(master_address=master_address, master_port=master_port,
                    rank_offset=rank_offset, world_size=world_size)
        await self._control(ControlKind.INIT_UPDATE_GROUP, args)

    async def update_weights_from_distributed(self, names: list[str], dtypes: list,
                                              shapes: list) -> None:
        """Every rank receives ``names`` from the trainer's rank 0 over the group
        ``init_weight_update_group`` made (``LLM``'s), between two steps."""
        args = dict(names=list(names), dtypes=[str(d).removeprefix("torch.") for d in dtypes],
                    shapes=[list(s) for s in shapes])
        await self._control(ControlKind.UPDATE_FROM_DISTRIBUTED, args)

    async def sleep(self, level: int = 1) -> None:
        """Frees device memory (``LLM.sleep``) between two steps; requests on the device
        are recomputed after ``wake_up`` (their tokens kept); nothing runs while asleep."""
        await self._control(ControlKind.SLEEP, {"level": level})

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """Allocates what ``sleep`` freed (``LLM.wake_up``)."""
        await self._control(ControlKind.WAKE_UP, {"tags": tags})

    async def is_sleeping(self) -> bool:
        return await self._call(lambda: self.engine.asleep)

    # -- the end ----------------------------------------------------------------------

    def shutdown(self) -> None:
        """Aborts what is in flight, stops the loop (the other ranks return from their
        constructor) and releases the engine and the process groups."""
        self.close()
        groups.shutdown()

    def close(self) -> None:
        """``shutdown`` but the job's process groups stay up (for another engine)."""
        if self._closed:
            return
        if self.is_driver:
            self._thread.stop()
        self._close_engine()

    def _close_engine(self) -> None:
        self._closed = True
        self._llm.close()

    # -- every rank: Control commands -------------------------------------------------

    def _on_control(self, msg: Control) -> None:
        """Runs a ``Control`` on this rank (rank 0 right after sending it). A ``SeesawError``
        (a bad update, checked alike on every rank) is rank 0's to report: the other ranks
        go on."""
        try:
            self._apply(msg.kind, json.loads(msg.args))
        except SeesawError:
            if self.is_driver:
                raise

    def _apply(self, kind: ControlKind, args: dict) -> None:
        engine = self.engine
        if kind == ControlKind.UPDATE_WEIGHTS:
            box = [self._payload]
            if dist.get_world_size() > 1:
                dist.broadcast_object_list(box, src=0, group=groups.host_group())
            engine.update_weights(box[0])
        elif kind == ControlKind.UPDATE_FROM_DISTRIBUTED:
            dtypes = [getattr(torch, d) for d in args["dtypes"]]
            self._llm.update_weights_from_distributed(args["names"], dtypes, args["shapes"])
        elif kind == ControlKind.INIT_UPDATE_GROUP:
            self._llm.init_weight_update_group(**args)
        elif kind == ControlKind.LOAD_WEIGHTS:
            engine.load_weights(args["path"])
        elif kind == ControlKind.SLEEP:
            engine.sleep(args["level"])
        elif kind == ControlKind.WAKE_UP:
            engine.wake_up(args["tags"])
        elif kind in LORA_CONTROLS:
            engine.lora_control(Control(kind, json.dumps(args)))
        else:
            raise SeesawError(f"unknown control {kind}")

    # -- the asyncio side -------------------------------------------------------------

    def _check_alive(self) -> None:
        if not self.is_driver:
            raise SeesawError("AsyncLLM takes requests on rank 0 only")
        if self._error is not None:
            raise EngineDeadError(str(self._error))
        if self._closed:
            raise SeesawError("this AsyncLLM was shut down")

    def _post(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        return self._thread.post(fn)

    def _fail(self, e: BaseException) -> None:
        """The engine thread failed: every stream hears of it; later calls raise it."""
        err = e if isinstance(e, SeesawError) else EngineDeadError(
            f"the engine loop failed: {type(e).__name__}: {e}")
        self._error = err
        for sink in list(self._streams.values()):
            sink(err)

    async def _call(self, fn: Callable[[], Any]) -> Any:
        """Runs ``fn`` on the engine thread between two steps and returns its result."""
        self._check_alive()
        return await asyncio.wrap_future(self._post(fn))

    async def _control(self, kind: ControlKind, args: dict) -> None:
        await self._call(lambda: self.engine.executor.control(Control(kind, json.dumps(args))))



class RequestStream:
    """One request's outputs (``AsyncLLM.add_request``): an async iterator that ends after
    the final output; ``close`` aborts the request if it has not finished."""

    def __init__(self, llm: AsyncLLM, request_id: str, outputs: asyncio.Queue) -> None:
        self.llm, self.request_id, self._outputs = llm, request_id, outputs
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        out = await self._outputs.get()
        if isinstance(out, BaseException):
            self.finished = True
            raise out
        self.finished = out.finished
        return out

    def close(self) -> None:
        """Aborts the request unless it finished (a dropped caller); idempotent."""
        llm = self.llm
        if not self.finished and not llm._closed and llm._error is None:
            llm._post(lambda: llm._loop.abort(self.request_id))
        self.finished = True


class Outbox:
    """Outputs for asyncio queues, gathered on the engine thread during a turn and handed to
    each event loop in one ``call_soon_threadsafe`` after it (a wake-up per turn, not one
    per request and step)."""

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list] = {}

    def put(self, aloop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item) -> None:
        self._items.setdefault(aloop, []).append((queue, item))

    def flush(self) -> None:
        items, self._items = self._items, {}
        for aloop, batch in items.items():
            try:
                aloop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # the caller's event loop is gone: nobody listens
                pass


def _put_all(batch: list) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
