"""Rank-failure detection and graceful stop for one rank of a job.

A rank that dies or hangs must not leave the others blocked in a collective (gloo has no
watchdog of its own, and its timeout is minutes). Each rank runs a ``Watchdog`` thread that,
every ``interval_s``:

- publishes a heartbeat counter through the job's c10d store;
- checks every peer: a peer on this host whose process is gone (its pid, matched by start
  time, is not running or is a zombie) has **exited**; a peer whose heartbeat has not changed
  for ``stale_s`` (another host, or a hung process) has **stopped responding**;
- on a failure, the lowest surviving rank prints one line naming the failed rank and the phase
  the job was in (``error: rank 1 exited during decode; ...``), every survivor runs its exit
  callbacks (flush the output file) and exits with status 1.

Signals: ``install_signal_handlers`` makes SIGTERM (what Slurm and the launchers send) and
SIGINT (Ctrl-C) request a stop. Rank 0's engine checks ``stop_signal`` between steps and stops
admitting and running work (``Interrupted``); a signal that reaches only a worker is relayed
to rank 0 through the store. If the stop has not finished ``grace_s`` later, or a second
signal comes, the rank flushes and exits at once. A launcher that SIGTERMs the survivors of a
dead rank gets the rank-failure message, not a stop.

Ranks shutting down normally first meet at a barrier and then ``disarm`` (see
``groups.finish``), so a peer that has already exited cleanly is never taken for a failure.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil
import torch.distributed as dist

from seesaw_mcore import env
from seesaw_mcore.errors import Interrupted

STOP_KEY = "seesaw/stop"
EXIT_KEY = "seesaw/exit"  # + "/RANK": that rank is exiting normally


@dataclass(frozen=True)
class Peer:
    """Where another rank's process runs."""

    host: str
    pid: int
    started: float  # process start time (guards against pid reuse)


@dataclass(frozen=True)
class Failure:
    """A peer rank that is gone."""

    rank: int
    how: str  # "exited", "stopped responding for 30 s"


class Watchdog:
    """Heartbeats, peer checks and signal-driven stop for this rank (see the module doc).

    Args:
        rank / world: this rank and the world size (collective: ``world`` > 1 gathers every
            rank's host and pid).
        interval_s: how often heartbeats are sent and peers checked.
        stale_s: a heartbeat unchanged this long means the peer stopped responding.
        grace_s: how long a requested stop may take before the rank exits at once.
    """

    def __init__(self, rank: int, world: int, interval_s: float = 1.0, stale_s: float = 30.0,
                 grace_s: float = 20.0) -> None:
        self.rank, self.world = rank, world
        self.interval_s, self.stale_s, self.grace_s = interval_s, stale_s, grace_s
        self.phase = "loading"  # what the job is doing; set by the engine (``set_phase``)
        self._kind_counts: dict[str, int] = {}
        # Fault injection for the reliability tests: "RANK:KIND:N" SIGKILLs rank RANK when it
        # enters its N-th step of KIND (prefill, decode, switch).
        self._kill_at = env.fault_kill()
        self.stop_signal: int | None = None
        self._stop_requested_at = 0.0
        self._stop_deadline: float | None = None
        self._exit_callbacks: list[Callable[[], None]] = []
        self._exiting = threading.Lock()
        self._armed = threading.Event()
        me = Peer(socket.gethostname(), os.getpid(), psutil.Process().create_time())
        self.peers: list[Peer] = [me]
        self._store = None
        if world > 1:
            box: list[Peer | None] = [None] * world
            dist.all_gather_object(box, me)
            self.peers = box
            from torch.distributed import distributed_c10d

            self._store = distributed_c10d._get_default_store()  # the job's rendezvous store
        # rank -> (last heartbeat, when it changed); a peer never heard from is stale too
        start = time.monotonic()
        self._beats: dict[int, tuple[str | None, float]] = {r: (None, start)
                                                            for r in range(world)}
        self._store_down_since: float | None = None
        self._clean_exits: set[int] = set()  # peers that announced a normal exit
        self._armed.set()
        self._thread = threading.Thread(target=self._loop, name="seesaw-watchdog", daemon=True)
        self._thread.start()

    # --- used by the engine and the job -------------------------------------------------
    def on_exit(self, callback: Callable[[], None]) -> None:
        """Runs ``callback`` (e.g. flush the output) before a failure or forced exit."""
        self._exit_callbacks.append(callback)

    def install_signal_handlers(self) -> None:
        """SIGTERM and SIGINT request a stop (main thread only)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def set_phase(self, kind: str, text: str) -> None:
        """The job enters a step of ``kind`` (prefill, decode, switch), described by ``text``
        in a failure message."""
        self.phase = text
        n = self._kind_counts[kind] = self._kind_counts.get(kind, 0) + 1
        if self._kill_at is not None and self._kill_at == [str(self.rank), kind, str(n)]:
            os.kill(os.getpid(), signal.SIGKILL)

    def check_stop(self) -> None:
        """Raises ``Interrupted`` once a stop was requested (rank 0, between steps)."""
        if self.stop_signal is not None:
            raise Interrupted(self.stop_signal)

    def disarm(self) -> None:
        """Stops the checks (every rank is past the final barrier)."""
        self._armed.clear()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * self.interval_s + 1)

    def announce_exit(self, wait_s: float = 5.0) -> None:
        """This rank is exiting normally (not after a failure): peers must not report it.
        Rank 0 hosts the store, so it waits up to ``wait_s`` for the peers to say the same."""
        if self._store is None:
            return
        try:
            self._store.set(f"{EXIT_KEY}/{self.rank}", "1")
            if self.rank == 0:
                keys = [f"{EXIT_KEY}/{r}" for r in range(1, self.world)]
                deadline = time.monotonic() + wait_s
                while time.monotonic() < deadline and not self._store.check(keys):
                    time.sleep(0.05)
        except Exception:  # noqa: BLE001, S110 - the store may already be gone
            pass

    def exit_if_peer_lost(self, wait_s: float | None = None) -> None:
        """After a communication error: if a peer is gone (or is found gone within
        ``wait_s``, default ``stale_s`` + 2 intervals), report it once and exit; else return
        so the caller re-raises its error."""
        deadline = time.monotonic() + (self.stale_s + 2 * self.interval_s
                                       if wait_s is None else wait_s)
        while True:
            failed = self.failed_peers()
            if failed:
                self._fail(failed)
                time.sleep(60)  # another thread is exiting the process
            if time.monotonic() >= deadline:
                return
            time.sleep(self.interval_s / 4)

    def failed_peers(self) -> list[Failure]:
        """Peers on this host whose process is gone, and peers whose heartbeat is stale."""
        now = time.monotonic()
        failed = []
        for r, peer in enumerate(self.peers):
            if r == self.rank or r in self._clean_exits:
                continue
            if peer.host == self.peers[self.rank].host and not _running(peer):
                how = "exited"
            elif now - self._beats[r][1] > self.stale_s:
                how = f"stopped responding for {self.stale_s:.0f} s"
            else:
                continue
            if not self._announced_exit(r):
                failed.append(Failure(r, how))
        return failed

    def _announced_exit(self, r: int) -> bool:
        """Whether rank ``r`` said it exits normally (asked again: it may have just now)."""
        try:
            if self._store is not None and self._store.check([f"{EXIT_KEY}/{r}"]):
                self._clean_exits.add(r)
        except Exception:  # noqa: BLE001, S110 - no store: no announcement
            pass
        return r in self._clean_exits

    # --- internals ----------------------------------------------------------------------
    def _on_signal(self, signum: int, frame) -> None:
        failed = self.failed_peers()  # launchers SIGTERM the survivors of a dead rank
        if failed:
            self._fail(failed)
        now = time.monotonic()
        if self.stop_signal is not None:
            # Ctrl-C reaches every process of the terminal and the launcher forwards a
            # SIGTERM too: a repeat within a second is the same request, named by the
            # SIGINT whichever of the two came first.
            if now - self._stop_requested_at > 1.0:
                self._exit(128 + signum,
                           f"{signal.Signals(signum).name} again: stopping at once")
            elif signum == signal.SIGINT:
                self.stop_signal = signum
            return
        self.stop_signal, self._stop_requested_at = signum, now
        self._stop_deadline = now + self.grace_s
        if self.rank != 0 and self._store is not None:  # rank 0 stops the job: tell it now
            try:
                self._store.set(STOP_KEY, str(signum))
            except Exception:  # noqa: BLE001, S110 - the watchdog thread retries
                pass

    def _loop(self) -> None:
        beat = 0
        while True:
            time.sleep(self.interval_s)
            if not self._armed.is_set():
                return
            beat += 1
            if self._store is not None:
                self._exchange(beat)
            failed = self.failed_peers()
            if failed and self._armed.is_set():
                self._fail(failed)
            if self._stop_deadline is not None and time.monotonic() > self._stop_deadline:
                name = signal.Signals(self.stop_signal).name
                self._exit(128 + self.stop_signal,
                           f"{name}: the stop took over {self.grace_s:.0f} s; stopping at once")

    def _exchange(self, beat: int) -> None:
        """Publishes this rank's heartbeat, reads the peers', relays a stop request."""
        store, now = self._store, time.monotonic()
        try:
            store.set(f"seesaw/hb/{self.rank}", str(beat))
            if self.stop_signal is not None and self.rank != 0:
                store.set(STOP_KEY, str(self.stop_signal))
            if self.rank == 0 and self.stop_signal in (None, signal.SIGTERM) \
                    and store.check([STOP_KEY]):
                relayed = int(store.get(STOP_KEY))
                if self.stop_signal is None:
                    self._stop_deadline = now + self.grace_s
                    self.stop_signal, self._stop_requested_at = relayed, now
                elif relayed == signal.SIGINT and now - self._stop_requested_at < 1.0:
                    self.stop_signal = relayed  # Ctrl-C, whose SIGTERM relay came first here
            for r in range(self.world):
                key = f"seesaw/hb/{r}"
                if r == self.rank or not store.check([key]):
                    continue
                if store.check([f"{EXIT_KEY}/{r}"]):
                    self._clean_exits.add(r)
                value = store.get(key).decode()
                if self._beats[r][0] != value:
                    self._beats[r] = (value, now)
            self._store_down_since = None
        except Exception:  # noqa: BLE001 - the store lives in rank 0's process
            self._store_down_since = self._store_down_since or now
            if (self.rank != 0 and 0 not in self._clean_exits
                    and now - self._store_down_since > 3 * self.interval_s):
                self._fail([Failure(0, "exited (its rendezvous store is gone)")])

    def _fail(self, failed: list[Failure]) -> None:
        if not self._exiting.acquire(blocking=False):
            return
        gone = {f.rank for f in failed}
        survivors = [r for r in range(self.world) if r not in gone]
        if survivors and self.rank == survivors[0]:  # one message for the job
            first = failed[0]
            print(f"error: rank {first.rank} {first.how} during {self.phase}; stopping every "
                  "rank (finished records are kept: rerun the same command to resume)",
                  file=sys.stderr, flush=True)
        self._run_callbacks_and_exit(1)

    def _exit(self, code: int, message: str) -> None:
        if not self._exiting.acquire(blocking=False):
            return
        if self.rank == 0:
            print(f"error: {message} (finished records are kept: rerun the same command to "
                  "resume)", file=sys.stderr, flush=True)
        self._run_callbacks_and_exit(code)

    def _run_callbacks_and_exit(self, code: int) -> None:
        for callback in self._exit_callbacks:
            try:
                callback()
            except Exception as e:  # noqa: BLE001 - exiting anyway; say what failed
                print(f"warning: exit callback failed: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)


def _running(peer: Peer) -> bool:
    try:
        proc = psutil.Process(peer.pid)
        return (abs(proc.create_time() - peer.started) < 1.0
                and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
