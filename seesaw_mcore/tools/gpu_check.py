"""The prepared GPU check (``make gpu-check``): one command of a few minutes on one CUDA GPU
that proves what a first GPU run must, and cannot lose its verdict. Each stage runs in its own
process under a time limit (printed at the start) and is written to the JSON file as soon as it
ends: a stage that fails, hangs or crashes is recorded (error or timeout, with its traceback)
and the next stage runs; a run can only end with a JSON of every stage.

0. ``versions``: Python, torch, triton, transformers, typing-extensions, deepspeed,
   megatron-core, hydra, numpy; the device.
1. ``kernel``: the paged-attention kernel (Triton on CUDA; under ``TRITON_INTERPRET=1`` on a
   CPU) against a dense float64 reference in float32 and bf16 (on a GPU: the tensor-core
   path the interpreter cannot check), at small mixed shapes and at real ones (head_dim 128,
   GQA 8, blocks of 16, contexts past 4k) and split-context decode; its decode time against
   dense SDPA.
2. ``closeness_bf16``: engine bf16 vs HF ``transformers`` bf16 on the same device (vLLM's
   ``check_logprobs_close``), with the KV cache sized by the profiling run.
3. ``throughput``: tokens/s against HF ``generate`` on a ~1.1B random Llama (TinyLlama's
   shape, bf16, 256 prompts of 32-512 tokens, 128 generated, greedy, EOS ignored), with CUDA
   graphs and with ``enforce_eager=True``; graphs vs eager judged by vLLM's logprob closeness
   (identical tokens reported as information: a random model's near-ties may flip).
4. ``ops_per_decode_step`` at batch 4 and 64 (``bench_step``).
5. ``host_copy``: host<->device bandwidth from pinned, pageable and registered shared memory
   (the host KV tier's kind), sized by ``/dev/shm``'s free space (skipped when too small).
6. ``seesaw_switch``: a phase switch needs two ranks on two devices (NCCL refuses two ranks
   on one GPU); on one GPU this stage records that and times the weight copy a switch makes
   (pinned host shard -> device) instead.

    python -m seesaw_mcore.tools.gpu_check --json gpu_check.json
    python -m seesaw_mcore.tools.gpu_check --quick      # tiny sizes: a smoke run on CPU

The CPU test suite and ``make gpu-rehearsal`` (the device image's packages, on CPU) run it
with ``--quick``. Without ``--quick`` it needs a CUDA device and says so at once.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

# The whole check's default limit: two runs and a machine's start fit a 15-minute lease.
LIMIT_S = 360
QUICK_LIMIT_S = 900  # --quick on a loaded 2-core CI machine
GRACE_S = 15  # past a stage's limit, the parent kills what the stage's own watchdog missed
# Distributed settings a child must not inherit: each stage is a world of its own.
_RANK_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE",
             "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE")


@dataclass(frozen=True)
class Stage:
    """One stage: ``fn`` (``module:function`` taking ``(device, root, quick)`` and returning
    its JSON-able result) under ``limit_s`` seconds (``quick_limit_s`` with ``--quick``)."""

    name: str
    fn: str
    limit_s: float
    quick_limit_s: float


_S = "seesaw_mcore.tools.gpu_stages:"
STAGES = [
    # the first stage pays the first imports (carried wheels are installed uncompiled)
    Stage("versions", _S + "versions", 45, 120),
    Stage("kernel", _S + "kernel_check", 60, 240),
    Stage("closeness_bf16", _S + "closeness_check", 60, 180),
    Stage("throughput", _S + "throughput_check", 120, 240),
    Stage("ops_per_decode_step", _S + "ops_check", 30, 120),
    Stage("host_copy", _S + "host_copy_check", 25, 60),
    Stage("seesaw_switch", _S + "switch_check", 20, 60),
]


def main(argv: list[str] | None = None, stages: list[Stage] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    ap.add_argument("--json", help="write the results here (after every stage)")
    ap.add_argument("--limit-s", type=float, help=f"the whole check's wall-clock limit "
                    f"(default {LIMIT_S}, {QUICK_LIMIT_S} with --quick)")
    ap.add_argument("--run-stage", help=argparse.SUPPRESS)  # child: module:function
    ap.add_argument("--root", help=argparse.SUPPRESS)  # child: the run's scratch folder
    ap.add_argument("--result", help=argparse.SUPPRESS)  # child: where its result goes
    args = ap.parse_args(argv)
    if args.run_stage:
        return _child(args)
    if not args.quick:
        problem = _not_cuda()
        if problem:
            print(f"error: gpu-check needs a CUDA GPU ({problem}); --quick runs the smoke "
                  f"check on a CPU", file=sys.stderr)
            return 2
    stages = STAGES if stages is None else stages
    limit = args.limit_s or (QUICK_LIMIT_S if args.quick else LIMIT_S)
    limits = {s.name: s.quick_limit_s if args.quick else s.limit_s for s in stages}
    print(f"gpu-check: {limit:g} s in all; per stage "
          + ", ".join(f"{k} {v:g} s" for k, v in limits.items()), file=sys.stderr, flush=True)
    root = tempfile.mkdtemp(prefix="gpu_check_")
    res: dict = {"quick": args.quick, "limit_s": limit, "stage_limits_s": limits}
    failed: list[str] = []
    t0 = time.monotonic()
    try:
        for stage in stages:
            left = limit - (time.monotonic() - t0)
            stage_limit = min(limits[stage.name], left)
            start = time.monotonic()
            if stage_limit < 5:
                out = {"timed_out": True, "limit_s": 0,
                       "not_started": f"the check's limit of {limit:g} s was spent"}
            else:
                print(f"gpu-check: {stage.name} (limit {stage_limit:.0f} s) ...",
                      file=sys.stderr, flush=True)
                out = run_stage(stage, stage_limit, root, args.quick)
            res[stage.name] = out
            if "error" in out or "timed_out" in out:  # ("skipped" is a stage's own say)
                failed.append(stage.name)
            res[stage.name + "_s"] = round(time.monotonic() - start, 1)
            res["seconds"] = round(time.monotonic() - t0, 1)
            _write(res, args.json)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    checks = _verdict(res)
    res["checks"], res["failed_stages"] = checks, failed
    _write(res, args.json)
    print(json.dumps(res, indent=2))
    ok = not failed and all(checks.values())
    print("gpu-check:", "OK" if ok else f"FAILED (stages {failed}, checks "
          f"{[k for k, v in checks.items() if not v]})", file=sys.stderr)
    return 0 if ok else 1


def run_stage(stage: Stage, limit_s: float, root: str, quick: bool) -> dict:
    """Runs one stage in a child process and returns its result, or what became of it:
    ``{"error", "traceback"}`` when it raised or died, ``{"timed_out", "traceback"}`` when its
    limit passed (the child's ``faulthandler`` dumps every thread's stack and exits; the
    parent kills it ``GRACE_S`` later if that did not happen)."""
    fd, result = tempfile.mkstemp(prefix=f"{stage.name}_", suffix=".json", dir=root)
    os.close(fd)
    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [env.get("PYTHONPATH"), repo]))
    env["PYTHONUNBUFFERED"] = "1"
    cmd = [sys.executable, "-m", "seesaw_mcore.tools.gpu_check", "--run-stage", stage.fn,
           "--root", root, "--result", result, "--limit-s", str(limit_s),
           *(["--quick"] if quick else [])]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True,
                            errors="replace", start_new_session=True)
    tail: collections.deque[str] = collections.deque(maxlen=400)
    reader = threading.Thread(target=_forward, args=(proc.stderr, tail), daemon=True)
    reader.start()
    killed = False
    try:
        proc.wait(timeout=limit_s + GRACE_S)
    except subprocess.TimeoutExpired:
        killed = True
    finally:
        _kill_group(proc)  # the stage's own children too (compilers, launchers)
        proc.wait()
        reader.join(timeout=5)
    err = "".join(tail)
    if killed or "Timeout (" in err:
        return {"timed_out": True, "limit_s": round(limit_s, 1),
                "traceback": _from(err, "Timeout (")[-6000:]}
    try:
        with open(result) as f:
            out = json.load(f)
    except (OSError, ValueError):
        out = None
    if out is None:
        return {"error": f"the stage's process exited {proc.returncode} with no result",
                "traceback": err[-6000:]}
    if proc.returncode != 0 and "error" not in out:
        out = {"error": f"the stage's process exited {proc.returncode} after its result "
                        f"(teardown)", "result": out, "traceback": err[-3000:]}
    return out


def _child(args) -> int:
    """One stage in this process: its limit armed before anything imports, its process groups
    shut down before it returns; the result (or its error) written to ``--result``."""
    import faulthandler

    faulthandler.dump_traceback_later(args.limit_s, exit=True)  # stacks to stderr, then exit
    import importlib
    import traceback

    from seesaw_mcore.runtime import groups

    out: dict
    code = 0
    try:
        groups.init_distributed()
        module, fn = args.run_stage.split(":")
        out = getattr(importlib.import_module(module), fn)(groups.device(), args.root,
                                                           args.quick)
    except Exception as e:  # noqa: BLE001 - recorded; the parent runs the next stage
        out, code = {"error": f"{type(e).__name__}: {e}",
                     "traceback": traceback.format_exc()[-3000:]}, 1
    try:
        groups.shutdown()  # no group left to interpreter teardown (a hang: the limit)
    except Exception as e:  # noqa: BLE001
        out, code = {"error": f"teardown: {type(e).__name__}: {e}", "result": out,
                     "traceback": traceback.format_exc()[-3000:]}, 1
    _write(out, args.result)
    faulthandler.cancel_dump_traceback_later()
    return code


def _not_cuda() -> str | None:
    """Why this is no CUDA run (``None``: it is): the accelerator DeepSpeed was told to use,
    or what torch sees."""
    forced = os.environ.get("DS_ACCELERATOR")
    if forced and forced != "cuda":
        return f"DS_ACCELERATOR={forced}"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} sees no CUDA device"
    return None


def _forward(stream, tail: collections.deque) -> None:
    """Copies a child's stderr to ours as it comes, keeping the last lines."""
    for line in stream:
        sys.stderr.write(line)
        sys.stderr.flush()
        tail.append(line)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _from(text: str, marker: str) -> str:
    i = text.find(marker)
    return text if i < 0 else text[i:]


def _write(res: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)


def _verdict(res: dict) -> dict[str, bool]:
    """The pass/fail checks over the stages that ran."""
    k, c, t = res.get("kernel", {}), res.get("closeness_bf16", {}), res.get("throughput", {})
    return {
        "kernel_float32": k.get("max_abs_err_float32", 1.0) < 1e-4,
        "kernel_bfloat16": k.get("max_abs_err_bfloat16", 1.0) < 5e-2,
        "kernel_real_shapes": k.get("real_shapes_max_abs_err", 1.0) < 5e-2,
        "kernel_split_decode": k.get("split_decode_max_abs_err", 0.0) < 5e-2,
        "closeness_bf16": c.get("close") == "ok",
        "graphs_close": t.get("graphs_close") == "ok",
    }


if __name__ == "__main__":
    sys.exit(main())
