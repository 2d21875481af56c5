"""Shared fixtures: tiny checkpoints built locally, and a launcher for multi-rank runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Triton kernels run on CPU through Triton's interpreter; set before anything (DeepSpeed
# imports triton when it is installed) imports triton in this process.
os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV_BIN = os.path.dirname(sys.executable)

# name -> build_random kwargs: GQA everywhere; layer counts PP splits unevenly.
MODELS = {
    "llama": dict(arch="llama", num_layers=3, vocab=250, seed=1),
    # the same architecture, other weights: what update_weights loads into "llama"
    "llama_b": dict(arch="llama", num_layers=3, vocab=250, seed=11),
    "qwen2": dict(arch="qwen2", num_layers=3, vocab=301, tie=True, seed=2),
    "llama3": dict(
        arch="llama", num_layers=5, vocab=260, seed=3, max_shard_size="100KB",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    ),
    # q/k norms, head_dim 32 != hidden / heads
    "qwen3": dict(arch="qwen3", num_layers=3, vocab=280, seed=7, head_dim=32),
    # mixture of experts: 4 experts, top 2; Qwen3-MoE with a dense layer 1 (mlp_only_layers)
    "qwen3_moe": dict(arch="qwen3_moe", num_layers=3, vocab=260, seed=12, head_dim=16),
    "mixtral": dict(arch="mixtral", num_layers=2, vocab=270, seed=13),
    # a 64-token sliding window: exact with max_model_len <= 64
    "mistral": dict(arch="mistral", num_layers=3, vocab=250, seed=8, sliding_window=64),
    # sleep mode: weights large enough that freeing them shows in RSS (~70 MB)
    "wide": dict(arch="llama", num_layers=2, hidden=256, intermediate=512, vocab=32000, seed=5),
    # T4 and P4: 4 KV heads, 4 layers.
    "llama4": dict(arch="llama", num_layers=4, heads=8, kv_heads=4, vocab=250, seed=4),
}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Builds each test checkpoint once per session; returns name -> folder."""
    from seesaw_mcore.bench.models import build_random

    root = tmp_path_factory.mktemp("models")
    return {name: build_random(str(root / name), **kw) for name, kw in MODELS.items()}


TINY = os.path.join(REPO, "models", "tiny-llama")  # the bundled demo model (has a tokenizer)


@pytest.fixture(scope="session")
def megatron_checkpoints(tiny_models, tmp_path_factory) -> str:
    """Megatron checkpoints written by megatron-core's own save on 4 CPU ranks
    (``tests/distributed/megatron_writer.py``): ``llama_root``, ``qwen2_tp2``, ``demo``.
    Written once per run: pytest-xdist workers share them (a file lock in the run's
    common temp folder)."""
    import fcntl

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # common to the run's workers
    root = shared / "megatron"
    with open(shared / "megatron.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "done").exists():
            proc = launch(4, ["tests.distributed.megatron_writer", tiny_models["llama"],
                              tiny_models["qwen2"], TINY, str(root)], timeout=300,
                          launcher="ds-launch")
            assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
            (root / "done").touch()
    return str(root)


def shm_files() -> set[str]:
    """Our host tiers and DeepSpeed's shm all-reduce buffers in /dev/shm."""
    import glob

    return set(glob.glob("/dev/shm/seesaw_kv_*") + glob.glob("/dev/shm/deepspeed_allreduce_*"))


def leftover_shm(before: set[str]) -> list[str]:
    """Files in /dev/shm that were not there ``before`` and that no live process maps: left
    behind. (Tests in other pytest-xdist workers map their own while they run.)"""
    import glob
    import time

    def mapped() -> set[str]:
        seen: set[str] = set()
        for maps in glob.glob("/proc/[0-9]*/maps"):
            try:
                with open(maps) as f:
                    seen.update(line.split(maxsplit=5)[-1].strip() for line in f
                                if "/dev/shm/" in line)
            except OSError:  # the process ended
                pass
        return seen

    new = shm_files() - before
    if new:
        time.sleep(1.0)  # one being created now is mapped (or gone) a moment later
        new = {f for f in shm_files() - before if f not in mapped()}
    return sorted(new)


def hf_greedy(model_path: str, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """HF ``generate`` greedy continuations (no EOS stop), the parity reference."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
            outs.append(g[0, len(p):].tolist())
    return outs


def launch(nprocs: int, args: list[str], timeout: float = 300.0,
           env: dict[str, str] | None = None, launcher: str = "deepspeed"
           ) -> subprocess.CompletedProcess:
    """Runs ``python -m <args>`` on ``nprocs`` ranks under ``launcher`` (plain ``python`` for
    one rank): ``deepspeed`` (the users' launcher), ``torchrun``, or ``ds-launch``: the
    deepspeed launcher's per-node ``deepspeed.launcher.launch`` without the runner in front of
    it (the same rank environment; ~3 s less start-up, the runner's own import of DeepSpeed)
    - the test harness's own jobs use it. A hang fails the test after ``timeout`` seconds."""
    return subprocess.run(launch_cmd(nprocs, args, launcher), cwd=REPO, env=launch_env(env),
                          capture_output=True, text=True, timeout=timeout)


def launch_worlds(module: str, worlds: dict[int, list[str]], model: str, tmp_path_factory,
                  timeout: float = 500.0) -> dict:
    """``launch_job`` once per world size (``{ranks: [plans]}``), each job given the model
    and its plans; their reports merged."""
    merged: dict = {}
    for world, plans in worlds.items():
        out = tmp_path_factory.mktemp(module.rsplit(".", 1)[-1]) / f"w{world}.json"
        merged.update(launch_job(world, module, out, [model, *plans], timeout=timeout))
    return merged


def launch_job(nprocs: int, module: str, out, args: list[str], timeout: float = 500.0) -> dict:
    """Runs a ``tests.distributed.*_job`` module that writes its report as JSON to ``out``;
    fails the test with the ranks' output tails if it exits non-zero."""
    proc = launch(nprocs, [module, *args[:1], str(out), *args[1:]], timeout=timeout,
                  launcher="ds-launch")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    with open(out) as f:
        return json.load(f)


def launch_cmd(nprocs: int, args: list[str], launcher: str = "deepspeed") -> list[str]:
    """The command ``launch`` runs."""
    if nprocs == 1:
        return [sys.executable, "-m", *args]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                str(nprocs), "--master-port", str(free_test_port()), "-m", *args]
    if launcher == "ds-launch":
        import base64
        import json

        hosts = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(nprocs))})
                                         .encode()).decode()
        return [sys.executable, "-u", "-m", "deepspeed.launcher.launch",
                f"--world_info={hosts}", "--master_addr=127.0.0.1",
                f"--master_port={free_test_port()}", "--no_local_rank", "--module", *args]
    assert launcher == "deepspeed", launcher
    return [os.path.join(VENV_BIN, "deepspeed"), "--no_local_rank", "--num_gpus", str(nprocs),
            "--master_port", str(free_test_port()), "--module", *args]


def launch_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment ``launch`` runs with: one thread per rank, unbuffered output."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(env or {}))


def free_test_port() -> int:
    """A free port for a launched job's rendezvous, below Linux's ephemeral range (32768+,
    where gloo's own connections take theirs) and in a range of its own per pytest-xdist
    worker, so no other test can take it between this check and the job's bind."""
    import random
    import socket

    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    low = 20000 + 2000 * (worker % 6)
    for _ in range(200):
        port = random.randrange(low, low + 2000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {low}..{low + 1999}")


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The ``error: ...`` lines a run printed (launcher prefixes stripped)."""
    text = proc.stdout + proc.stderr
    return [line[line.index("error: "):] for line in text.splitlines() if "error: " in line
            and "[ERROR]" not in line]
