"""The engine loop on a thread of its own (``AsyncLLM``'s engine thread): one long engine
session, commands run between two turns of the loop, keep-alives while idle.

Callers on other threads never touch the engine: they ``post`` a function and get a
``concurrent.futures.Future`` of its result; the thread runs every queued command before the
next turn (so a submit, an abort or a weight update lands between two steps). While the loop
has nothing to run, the thread blocks on its queue and, with more than one rank, sends a
``Control`` keep-alive every ``keepalive_s`` so the other ranks' wait for the next message
never reaches the collective timeout. If the loop fails, ``on_fail`` hears of it once and
every queued command's future raises the error.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from seesaw_mcore.contract import Control, ControlKind
from seesaw_mcore.engine.engine import Engine
from seesaw_mcore.engine.loop import EngineLoop
from seesaw_mcore.runtime import groups

_STOP = object()  # the thread's last command


class LoopThread:
    """Turns ``loop`` on a thread inside ``engine.session()`` (see the module doc).

    Args:
        engine: the engine, rank 0's.
        loop: the engine loop the thread turns.
        device: this rank's device, as the constructing thread sees it (a thread's current
            device is its own: the thread sets it first).
        keepalive_s: how often an idle loop tells the other ranks it is there.
        on_fail: called once, on the thread, with the error that ended the loop.
        after_turn: called on the thread after every turn and command (hands the outputs
            they made to their consumers at once: one wake-up a turn, not one an output).
    """

    def __init__(self, engine: Engine, loop: EngineLoop, device: torch.device,
                 keepalive_s: float, on_fail: Callable[[BaseException], None],
                 after_turn: Callable[[], None] = lambda: None) -> None:
        self.engine, self.loop, self.device = engine, loop, device
        self.keepalive_s, self.on_fail, self.after_turn = keepalive_s, on_fail, after_turn
        self._inbox: queue.Queue = queue.Queue()
        self._pause_waiters: list[concurrent.futures.Future] = []
        self._thread = threading.Thread(target=self._run, name="seesaw-engine-loop",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def post(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Queues ``fn`` to run on the thread between two turns; its future has the result."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put((fn, fut))
        return fut

    def when_paused(self) -> concurrent.futures.Future:
        """On the thread: a future done once the loop is paused (at once if it is)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._pause_waiters.append(fut)
        self._resolve_pause()
        return fut

    def stop(self) -> None:
        """Aborts what is in flight, ends the session (the other ranks' ``serve`` returns)
        and joins the thread."""
        self._inbox.put((_STOP, None))
        self._thread.join()

    def _run(self) -> None:
        engine, loop = self.engine, self.loop
        try:
            if self.device.type != "cpu":
                groups.accelerator().set_device(self.device.index or 0)
            with engine.session():
                busy = False
                while True:  # every queued command runs before the next turn
                    try:
                        fn, fut = self._inbox.get(block=not busy, timeout=None if busy
                                                  else self.keepalive_s)
                    except queue.Empty:
                        fn = None
                        if not busy and dist.get_world_size() > 1:  # idle: a sign of life
                            engine.executor.control(Control(ControlKind.KEEPALIVE))
                    if fn is _STOP:
                        loop.abort_all()
                        self.after_turn()
                        break
                    if fn is not None:
                        _run_command(fn, fut)
                        self.after_turn()
                        busy = True  # then a turn, for what it may have queued
                        continue
                    busy = loop.iterate()
                    self.after_turn()
                    self._resolve_pause()
        except BaseException as e:  # noqa: BLE001 - every waiter hears of it
            self._fail(e)

    def _resolve_pause(self) -> None:
        if self.loop.paused is not None:
            for fut in self._pause_waiters:
                fut.set_result(None)
            self._pause_waiters.clear()

    def _fail(self, e: BaseException) -> None:
        self.on_fail(e)
        self.after_turn()
        for fut in self._pause_waiters:
            fut.set_exception(e)
        while True:
            try:
                _fn, fut = self._inbox.get_nowait()
            except queue.Empty:
                break
            if fut is not None:
                fut.set_exception(e)


def _run_command(fn: Callable[[], Any], fut: concurrent.futures.Future | None) -> None:
    try:
        result = fn()
    except BaseException as e:  # noqa: BLE001 - the caller gets it
        if fut is not None:
            fut.set_exception(e)
        return
    if fut is not None:
        fut.set_result(result)
