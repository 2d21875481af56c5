"""The prepared GPU check (``make gpu-check``): one command of a few minutes on one CUDA GPU
that proves what a first GPU run must. Stages, each written to the JSON file as soon as it
ends (a failure keeps what came before and is recorded without stopping the rest):

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
   graphs and with ``enforce_eager=True`` (same tokens; decode ms per step of each).
4. ``ops_per_decode_step`` at batch 4 and 64 (``bench_step``).
5. ``host_copy``: host<->device bandwidth from pinned, pageable and registered shared memory
   (the host KV tier's kind).
6. ``seesaw_switch``: a phase switch needs two ranks on two devices (NCCL refuses two ranks
   on one GPU); on one GPU this stage records that and times the weight copy a switch makes
   (pinned host shard -> device) instead.

    python -m seesaw_mcore.tools.gpu_check --json gpu_check.json
    python -m seesaw_mcore.tools.gpu_check --quick      # tiny sizes: a smoke run on CPU

The CPU test suite and ``make gpu-rehearsal`` (the device image's packages, on CPU) run it
with ``--quick``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from seesaw_mcore.bench.common import emit
from seesaw_mcore.tools.gpu_stages import (
    closeness_check,
    host_copy_check,
    kernel_check,
    ops_check,
    switch_check,
    throughput_check,
    versions,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run)")
    ap.add_argument("--json", help="write the results here (after every stage)")
    args = ap.parse_args(argv)
    from seesaw_mcore.runtime import groups

    groups.init_distributed()
    dev = groups.device()
    root = tempfile.mkdtemp(prefix="gpu_check_")
    res: dict = {"quick": args.quick}
    failed: list[str] = []
    stages = [
        ("versions", lambda: versions(dev)),
        ("kernel", lambda: kernel_check(dev, args.quick)),
        ("closeness_bf16", lambda: closeness_check(dev, root, args.quick)),
        ("throughput", lambda: throughput_check(dev, root, args.quick)),
        ("ops_per_decode_step", lambda: ops_check(dev)),
        ("host_copy", lambda: host_copy_check(dev, args.quick)),
        ("seesaw_switch", lambda: switch_check(dev, root, args.quick)),
    ]
    t0 = time.perf_counter()
    for name, stage in stages:
        start = time.perf_counter()
        print(f"gpu-check: {name} ...", file=sys.stderr, flush=True)
        try:
            res[name] = stage()
        except Exception as e:  # noqa: BLE001 - recorded; the next stages still run
            import traceback

            res[name] = {"error": f"{type(e).__name__}: {e}",
                         "traceback": traceback.format_exc()[-3000:]}
            failed.append(name)
        res[name + "_s"] = round(time.perf_counter() - start, 1)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        _write(res, args.json)
    checks = _verdict(res)
    res["checks"], res["failed_stages"] = checks, failed
    emit(res, args.json)
    ok = not failed and all(checks.values())
    print("gpu-check:", "OK" if ok else f"FAILED (stages {failed}, checks "
          f"{[k for k, v in checks.items() if not v]})", file=sys.stderr)
    return 0 if ok else 1


def _write(res: dict, path: str | None) -> None:
    if path:
        import json

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
        "graphs_same_tokens": t.get("graphs_same_tokens", False),
    }


if __name__ == "__main__":
    sys.exit(main())
