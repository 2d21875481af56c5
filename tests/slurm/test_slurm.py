"""launch/slurm/infer.sbatch and serve.sbatch on a real two-node Slurm cluster
(tests/slurm/cluster.sh: each node its own network namespace, address and hostname), against
a single-process run of the same prompts. Run by ``make slurm-test`` (which installs slurm-wlm
and munge); needs root."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO

CLUSTER = os.path.join(REPO, "tests", "slurm", "cluster.sh")
SBATCH = os.path.join(REPO, "launch", "slurm", "infer.sbatch")
SERVE = os.path.join(REPO, "launch", "slurm", "serve.sbatch")
NODE_ADDRESSES = {"node1": "10.77.0.11", "node2": "10.77.0.12"}  # tests/slurm/cluster.sh
COMMON = ["sampling.max_tokens=16", "progress=false", "data.overwrite=true"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The running cluster's environment (``SLURM_CONF``); stopped after the module."""
    missing = [b for b in ("sbatch", "slurmctld", "slurmd", "munged", "ip", "unshare")
               if shutil.which(b) is None]
    assert not missing, f"{missing} not installed: run make slurm-test (installs slurm-wlm, munge)"
    assert os.geteuid() == 0, "the Slurm test cluster needs root (network namespaces)"
    state = tmp_path_factory.mktemp("slurm")
    os.chmod(state, 0o755)
    up = subprocess.run([CLUSTER, "up", str(state)], capture_output=True, text=True,
                        timeout=120)
    env = {**os.environ, "SLURM_CONF": str(state / "slurm.conf"),
           "SEESAW_PYTHON": sys.executable, "SEESAW_REPO": REPO}
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield env, state
    finally:
        subprocess.run([CLUSTER, "down", str(state)], capture_output=True, timeout=60)


def sbatch(env, log, sbatch_args: list[str], overrides: list[str]) -> str:
    """Submits infer.sbatch; returns the job id."""
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log}", *sbatch_args, SBATCH,
                           *overrides], env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def wait(env, job: str, log, timeout: float) -> tuple[str, str, str]:
    """Waits for ``job`` to end.

    Returns:
        ``(job state, exit code, job output)``.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True,
                              text=True).stdout
        state = re.search(r"JobState=(\S+)", info).group(1)
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            code = re.search(r" ExitCode=(\S+)", info).group(1)
            return state, code, log.read_text() if log.exists() else ""
        time.sleep(1)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} did not finish in {timeout}s: {log.read_text()[-3000:]}")


def submit(env, out_dir, name: str, sbatch_args: list[str], overrides: list[str],
           timeout: float = 240) -> tuple[str, str, str]:
    """Submits infer.sbatch and waits for it (see ``wait``)."""
    log = out_dir / f"{name}.log"
    return wait(env, sbatch(env, log, sbatch_args, overrides), log, timeout)


def records(path) -> dict[str, list]:
    return {r["id"]: [(o["token_ids"], o["text"], o["finish_reason"]) for o in r["outputs"]]
            for r in map(json.loads, open(path))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The same prompts through one plain ``python`` process (plan T1)."""
    out = tmp_path_factory.mktemp("ref") / "t1.jsonl"
    proc = subprocess.run([sys.executable, "launch/infer.py", "plan=t1", f"data.output={out}",
                           *COMMON], cwd=REPO, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return records(out)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def test_static_tp_across_two_nodes_matches_single_process(slurm, reference, tmp_path):
    env, state = slurm
    out = tmp_path / "t2.jsonl"
    job_state, code, log = submit(env, tmp_path, "t2", ["--nodes=2", "--ntasks-per-node=1"],
                                  ["plan=t2", f"data.output={out}", *COMMON])
    assert (job_state, code) == ("COMPLETED", "0:0"), log[-3000:]
    assert records(out) == reference
    for node in ("node1", "node2"):  # one rank really ran on each node
        assert re.search(r"launch task StepId=\d+\.0", (state / "log" / f"slurmd-{node}.log")
                         .read_text()), node


def test_seesaw_plan_on_one_node_matches_single_process(slurm, reference, tmp_path):
    env, _ = slurm
    out = tmp_path / "p2_t2.jsonl"
    job_state, code, log = submit(env, tmp_path, "p2t2", ["--nodes=1", "--ntasks-per-node=2"],
                                  ["plan=p2_t2", "cache.host_kv_tokens=64",
                                   f"data.output={out}", *COMMON])
    assert (job_state, code) == ("COMPLETED", "0:0"), log[-3000:]
    assert "switch P2 -> T2 (decode)" in log
    assert records(out) == reference


@pytest.mark.parametrize("sbatch_args,overrides,message", [
    # The host KV tier is per node: a re-sharding plan across nodes is refused.
    (["--nodes=2", "--ntasks-per-node=1"], ["plan=p2_t2"],
     r"error: plan P2 -> T2: the host KV tier is per node, so a plan that re-shards must run "
     r"all 2 ranks on one node \(this node has 1\); use a static plan across nodes \(Slurm job "
     r"\d+: 2 tasks, per node 1\(x2\); request the plan's ranks with sbatch --nodes / "
     r"--ntasks-per-node\)"),
    # Slurm started 3 tasks for a 2-rank plan.
    (["--nodes=2", "--ntasks=3"], ["plan=t2"],
     r"error: layout T2 needs DP x TP x PP = 1 x 2 x 1 = 2 ranks, but the world size is 3 "
     r"\(Slurm job \d+: 3 tasks, per node 2,1; request the plan's ranks with sbatch --nodes / "
     r"--ntasks-per-node\)"),
])
def test_plan_inconsistent_with_the_allocation(slurm, tmp_path, sbatch_args, overrides,
                                               message):
    env, _ = slurm
    job_state, code, log = submit(env, tmp_path, "bad", sbatch_args,
                                  [*overrides, f"data.output={tmp_path / 'o.jsonl'}", *COMMON],
                                  timeout=180)
    assert job_state == "FAILED" and code != "0:0", log[-3000:]
    assert [line for line in error_lines(log) if re.fullmatch(message, line)], log[-3000:]


def test_scancel_sigterm_stops_and_a_resubmit_completes(slurm, tmp_path):
    """``scancel --signal=TERM`` (what the time limit sends): the job stops with the
    interrupted message and its finished records; submitting it again completes the file."""
    env, _ = slurm
    prompts, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    n = 3000
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"Item {i} is"}) + "\n"
                               for i in range(n)))
    args = ["plan=p2_t2", f"data.input={prompts}", f"data.output={out}", "progress=false",
            "sampling.max_tokens=24", "cache.host_kv_tokens=2048"]
    log = tmp_path / "first.log"
    job = sbatch(env, log, ["--nodes=1", "--ntasks-per-node=2"], args)
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and not (out.exists() and
                                               len(out.read_text().splitlines()) >= 50):
        time.sleep(0.3)
    subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True)
    state, _, text = wait(env, job, log, 120)
    assert state != "COMPLETED", text[-3000:]
    assert [line for line in error_lines(text) if line.startswith(
        "error: interrupted by SIGTERM: stopped admitting prompts; ")], text[-3000:]
    done = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert 50 <= len(done) < n and len(set(done)) == len(done)
    state, code, text = submit(env, tmp_path, "second", ["--nodes=1", "--ntasks-per-node=2"],
                               args)
    assert (state, code) == ("COMPLETED", "0:0"), text[-3000:]
    assert f"{len(done)} ids already done" in text
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"q{i}" for i in range(n))


def test_a_rank_killed_on_the_second_node_ends_the_job(slurm, tmp_path):
    """Rank 1 (node2) SIGKILLed mid-decode: ``srun --kill-on-bad-exit`` ends the step at
    once, naming the node and task; nothing hangs."""
    env, _ = slurm
    start = time.monotonic()
    state, code, log = submit({**env, "SEESAW_FAULT_KILL": "1:decode:3"}, tmp_path, "kill",
                              ["--nodes=2", "--ntasks-per-node=1"],
                              ["plan=t2", f"data.output={tmp_path / 'o.jsonl'}", *COMMON],
                              timeout=120)
    assert state == "FAILED" and code != "0:0", log[-3000:]
    assert time.monotonic() - start < 90
    assert "srun: error: node2: task 1: Killed" in log, log[-3000:]


def test_serve_sbatch_answers_across_nodes_and_scancel_stops_it(slurm, reference, tmp_path):
    """launch/slurm/serve.sbatch on two nodes (T2): the endpoint it prints answers a client
    outside the allocation with the offline run's greedy text; ``scancel --signal=TERM``
    stops it and every task exits 0."""
    import httpx

    env, _ = slurm
    log, port = tmp_path / "serve.log", 18123
    proc = subprocess.run(["sbatch", "--parsable", f"--output={log}", "--nodes=2",
                           "--ntasks-per-node=1", SERVE, "plan=t2", f"server.port={port}"],
                          env=env, capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 200
    while time.monotonic() < deadline and not (log.exists() and "serving " in log.read_text()):
        time.sleep(0.5)
    text = log.read_text() if log.exists() else ""
    m = re.search(r"^endpoint: http://(node\d):(\d+)/v1 \(job \d+\)$", text, re.M)
    assert m and "serving tiny-llama on http://0.0.0.0:" in text, text[-3000:]
    url = f"http://{NODE_ADDRESSES[m.group(1)]}:{m.group(2)}/v1"
    rec = next(r for r in map(json.loads, open(os.path.join(REPO, "data",
                                                            "sample_prompts.jsonl")))
               if "prompt" in r)
    try:
        r = httpx.post(url + "/completions", timeout=60, json={
            "prompt": rec["prompt"], "max_tokens": 16, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == reference[rec["id"]][0][1]
    finally:
        subprocess.run(["scancel", "--signal=TERM", job], env=env, check=True)
    state, code, text = wait(env, job, log, 120)
    assert (state, code) == ("COMPLETED", "0:0"), text[-3000:]
    assert "server stopped" in text
