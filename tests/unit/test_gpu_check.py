"""``make gpu-check``'s script runs end to end (``--quick``, on this machine's CPU): the same
code a GPU run takes, minus the CUDA-only kernel dispatch."""

from __future__ import annotations

import json

from tests.conftest import launch


def test_gpu_check_quick_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = launch(1, ["seesaw_mcore.tools.gpu_check", "--quick", "--json", str(out)],
                  timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu-check: OK" in proc.stderr
    res = json.loads(out.read_text())
    assert res["kernel"]["max_abs_err_float32"] < 1e-4
    assert res["closeness_bf16"]["close"] == "ok"
    assert res["throughput"]["engine_tok_s"] > 0 and res["throughput"]["hf_tok_s"] > 0
    ops = [r["ops_per_step"] for r in res["ops_per_decode_step"]]
    assert ops[1] <= 1.25 * ops[0], ops  # per-step work does not grow with the batch


def test_ops_per_decode_step_do_not_grow_with_batch(tmp_path):
    """Aten ops per decode step (counted, not timed) at batch 4 and 64, greedy and seeded
    top-k/top-p sampling: the data plane's per-step work is O(layers), not O(sequences)."""
    out = tmp_path / "step.json"
    proc = launch(1, ["seesaw_mcore.bench.step", "--batches", "4", "64", "--json",
                      str(out)], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["greedy_ops_ratio_64_vs_4"] <= 1.25
    assert res["sampled_ops_ratio_64_vs_4"] <= 1.25
