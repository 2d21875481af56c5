"""Faults under the deepspeed launcher, on two ranks running P2 -> T2: a rank SIGKILLed
mid-prefill, mid-switch (rank 1) and mid-decode (rank 0), and a rank frozen by SIGSTOP (the
others exit with one message naming the rank and the phase); SIGTERM to every process (what
Slurm sends), Ctrl-C (SIGINT to the process group) and SIGTERM to one worker stop admitting,
keep every finished record and leave no KV file, and a rerun completes the output exactly as
an uninterrupted run; 2,000 and 20,000 prompts with flat peak RSS."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import psutil
import pytest

from tests.conftest import (
    REPO,
    error_lines,
    launch,
    launch_cmd,
    launch_env,
    leftover_shm,
    shm_files,
)

NUM_PROMPTS = 3000
ARGS = ["plan=p2_t2", "sampling.max_tokens=16", "cache.host_kv_tokens=2048", "progress=false"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("rel") / "prompts.jsonl"
    with open(path, "w") as f:
        for i in range(NUM_PROMPTS):
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Item {i} of the list is"}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def reference(prompts, tmp_path_factory) -> dict[str, list]:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("rel") / "ref.jsonl"
    proc = launch(2, ["launch.infer", *ARGS, f"data.input={prompts}", f"data.output={out}"],
                  timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _outputs(out)


def _outputs(path) -> dict[str, list]:
    rows = [json.loads(line) for line in open(path)]  # every line a complete record
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate ids"
    return {r["id"]: [o["token_ids"] for o in r["outputs"]] for r in rows}




@pytest.mark.parametrize("fault,message", [
    ("1:prefill:2", "error: rank 1 exited during prefill; "),
    ("1:switch:2", "error: rank 1 exited during the switch T2 -> P2 (prefill); "),
    ("0:decode:5", "error: rank 0 exited during decode; "),
])
def test_a_killed_rank_stops_every_rank_with_one_message(prompts, tmp_path, fault, message):
    """``SEESAW_FAULT_KILL=RANK:KIND:N`` SIGKILLs that rank as it enters its N-th step."""
    out = tmp_path / "o.jsonl"
    start = time.monotonic()
    proc = launch(2, ["launch.infer", *ARGS, f"data.input={prompts}", f"data.output={out}"],
                  timeout=150, env={"SEESAW_FAULT_KILL": fault})
    assert proc.returncode != 0
    assert time.monotonic() - start < 90  # ~15 s of start-up, then well within 60 s
    lines = [line for line in error_lines(proc) if line.startswith("error: rank")]
    assert len(lines) == 1 and lines[0].startswith(message), error_lines(proc)
    assert lines[0].endswith("stopping every rank (finished records are kept: rerun the same "
                             "command to resume)")
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    _outputs(out)  # what finished is intact


def _start_mid_run(out, extra: list[str], env: dict[str, str] | None = None
                   ) -> tuple[subprocess.Popen, object]:
    """Starts the job on ``out`` and returns ``(launcher, log file)`` once 50 records are
    finished (the job still running, its rank processes known)."""
    cmd = launch_cmd(2, ["launch.infer", *ARGS, f"data.output={out}", *extra])
    log = open(f"{out}.log", "w+")  # a file, not a pipe: nobody blocks on a full pipe
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(env), stdout=log,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.exists(out) and sum(1 for _ in open(out)) >= 50:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the job ended before it could be interrupted"
    assert len(_ranks(proc)) == 2
    return proc, log


def _interrupt(prompts, out, disk_dir, send) -> tuple[int, str, float]:
    """Starts the job, waits for 50 finished records, calls ``send(popen)``; returns the
    exit status, the output and how long the job took to exit after the signal."""
    proc, log = _start_mid_run(out, [f"data.input={prompts}", f"cache.disk_path={disk_dir}",
                                     "cache.disk_kv_tokens=4096"])
    sent = time.monotonic()
    send(proc)
    proc.wait(timeout=60)
    while any(_running(c.pid) for c in _ranks(proc)):  # the ranks outlive a killed runner
        assert time.monotonic() - sent < 60
        time.sleep(0.2)
    took = time.monotonic() - sent
    log.seek(0)
    return proc.returncode, log.read(), took


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


_RANKS: dict[int, list[psutil.Process]] = {}  # launcher pid -> its rank processes


def _ranks(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The job's rank processes (found while the launcher runs, kept after)."""
    if launcher.pid not in _RANKS and launcher.poll() is None:
        found = []
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if "launch.infer" in child.cmdline() and "RANK" in child.environ():
                    found.append(child)
            except psutil.Error:
                continue
        _RANKS[launcher.pid] = sorted(found, key=lambda c: int(c.environ()["RANK"]))
    return _RANKS.get(launcher.pid, [])


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    ranks = _ranks(launcher)
    assert len(ranks) == 2, "rank processes not found"
    return ranks[rank].pid


SENDERS = {
    # Slurm (scancel, time limit) and `timeout` signal every process of the job
    "sigterm_all": lambda p: os.killpg(p.pid, signal.SIGTERM),
    # Ctrl-C: SIGINT to the terminal's whole process group
    "ctrl_c": lambda p: os.killpg(p.pid, signal.SIGINT),
    # one worker only (an OOM killer's warning, an operator): relayed to rank 0
    "sigterm_rank1": lambda p: os.kill(_rank_pid(p, 1), signal.SIGTERM),
}


@pytest.mark.parametrize("how", list(SENDERS))
def test_signal_stops_cleanly_and_a_rerun_completes(prompts, reference, tmp_path, how):
    out, disk = tmp_path / "o.jsonl", tmp_path / "disk"
    disk.mkdir()
    before = shm_files()
    code, text, took = _interrupt(prompts, out, disk, SENDERS[how])
    assert code != 0 and took < 30, text[-3000:]
    name = "SIGINT" if how == "ctrl_c" else "SIGTERM"
    [line] = [x[x.index("error: "):] for x in text.splitlines() if "error: interrupted" in x]
    assert line.startswith(f"error: interrupted by {name}: stopped admitting prompts; ")
    assert line.endswith(f"records finished in this run are in {out}; rerun the same command "
                         "to resume")
    done = _outputs(out)  # complete records only, each once
    assert 50 <= len(done) < NUM_PROMPTS
    assert os.listdir(disk) == [] and leftover_shm(before) == []  # no KV file left
    for rid, toks in done.items():
        assert toks == reference[rid]
    if how != "sigterm_all":  # the rerun is the same for every signal: checked once
        return
    proc = launch(2, ["launch.infer", *ARGS, f"data.input={prompts}", f"data.output={out}"],
                  timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resuming {out}: {len(done)} ids already done" in proc.stdout
    assert _outputs(out) == reference  # nothing lost, nothing twice


def _load_run(n: int, tmp_path) -> tuple[list[dict], list[float]]:
    path, out = tmp_path / f"in{n}.jsonl", tmp_path / f"out{n}.jsonl"
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"r{i}", "prompt": f"Load test prompt {i}"}) + "\n")
    proc = launch(2, ["launch.infer", "plan=p2_t2", "sampling.max_tokens=4",
                      "cache.host_kv_tokens=4096", "progress=false", f"data.input={path}",
                      f"data.output={out}"], timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [line] = [x for x in proc.stdout.splitlines() if "peak RSS per rank: " in x]
    peaks = [float(p.split()[0]) for p in line.split(": ")[1].split(", ")]
    return [json.loads(x) for x in open(out)], peaks


def test_20000_prompts_complete_with_flat_memory(tmp_path):
    """P2 -> T2, host tier of 4,096 tokens: 2,000 and 20,000 prompts all complete, each id
    once, written in completion order, and peak RSS per rank does not grow with the input."""
    small, small_peaks = _load_run(2000, tmp_path)
    rows, peaks = _load_run(20000, tmp_path)
    for n, got in ((2000, small), (20000, rows)):
        assert sorted(r["id"] for r in got) == sorted(f"r{i}" for i in range(n))
        lat = [r["latency_s"] for r in got]
        assert lat == sorted(lat)  # appended as each finished
    print(f"peak RSS per rank (MB): 2,000 prompts {small_peaks}, 20,000 prompts {peaks}")
    for a, b in zip(small_peaks, peaks):
        assert b - a < 64, (small_peaks, peaks)  # 10x the prompts: under 64 MB more
        # the stated bound (docs/design.md): 1 GiB of it is the KV cache, and 250-400 MB
        # torch's and DeepSpeed's library pages, which count as resident when the page cache
        # holds them (a fresh install: ~100 MB more than on a machine that has evicted them)
        assert b < 1900


def test_a_hung_rank_is_reported_after_the_heartbeat_timeout(prompts, tmp_path):
    """Rank 1 frozen (SIGSTOP) mid-run: rank 0 sees its heartbeat stop and exits with one
    message (``SEESAW_WATCHDOG_STALE_S=5`` here; 30 s by default)."""
    out = tmp_path / "o.jsonl"
    proc, log = _start_mid_run(out, [f"data.input={prompts}"], {"SEESAW_WATCHDOG_STALE_S": "5"})
    try:
        rank0, rank1 = _rank_pid(proc, 0), _rank_pid(proc, 1)
        os.kill(rank1, signal.SIGSTOP)
        stopped = time.monotonic()
        while time.monotonic() - stopped < 60 and _running(rank0):  # rank 0 gives up
            time.sleep(0.2)
        took = time.monotonic() - stopped
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the frozen rank would sit out the launcher's 30 s
    proc.wait(timeout=60)
    log.seek(0)
    text = log.read()
    assert 3 <= took < 20, text[-3000:]  # 5 s after its last heartbeat
    lines = [x[x.index("error: "):] for x in text.splitlines() if "error: rank" in x]
    assert len(lines) == 1, text[-3000:]
    assert re.fullmatch(r"error: rank 1 stopped responding for 5 s during (prefill|decode|the "
                        r"switch .*); stopping every rank \(finished records are kept: rerun "
                        r"the same command to resume\)", lines[0]), lines[0]
    _outputs(out)
