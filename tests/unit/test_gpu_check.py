"""``make gpu-check``'s script runs end to end (``--quick``, on this machine's CPU): the same
code a GPU run takes, minus the CUDA-only kernel dispatch."""

from __future__ import annotations

import json

import torch

from tests.conftest import launch

FAKE = "tests.unit.gpu_check_stages:"


def _stages(*named):
    from seesaw_mcore.tools.gpu_check import Stage

    return [Stage(name, FAKE + fn, limit, limit) for name, fn, limit in named]


def test_a_failing_or_hanging_stage_is_recorded_and_the_rest_still_run(tmp_path, capfd):
    """Each stage runs in its own process under its limit; one that raises is recorded with
    its error, one that hangs is cut at its limit with its stack, and the later stages still
    run; every stage's result is on disk as soon as it ends; the exit status says so."""
    from seesaw_mcore.tools import gpu_check

    out = tmp_path / "g.json"
    stages = _stages(("versions", "ok", 120), ("kernel", "boom", 120),
                     ("hang", "sleep_forever", 15), ("after", "ok", 120))
    assert gpu_check.main(["--quick", "--json", str(out), "--limit-s", "600"], stages) == 1
    res = json.loads(out.read_text())
    assert res["kernel"]["error"] == "RuntimeError: no kernel image is available"
    assert res["hang"]["timed_out"] and res["hang"]["limit_s"] == 15
    assert "sleep_forever" in res["hang"]["traceback"]  # where it hung
    assert 15 <= res["hang_s"] < 15 + gpu_check.GRACE_S + 5
    assert res["after"] == {"ran": True, "device": "cpu"}  # the next stage ran
    assert res["failed_stages"] == ["kernel", "hang"]
    err = capfd.readouterr().err
    assert "gpu-check: 600 s in all; per stage versions 120 s, kernel 120 s, hang 15 s" in err


def test_the_whole_limit_bounds_the_stages(tmp_path):
    """Past the whole check's limit a stage is cut (its own limit is what is left) and the
    ones after it are recorded as not started; the JSON holds every stage."""
    from seesaw_mcore.tools import gpu_check

    out = tmp_path / "g.json"
    stages = _stages(("hang", "sleep_forever", 300), ("after", "ok", 300))
    assert gpu_check.main(["--quick", "--json", str(out), "--limit-s", "20"], stages) == 1
    res = json.loads(out.read_text())
    assert res["hang"]["timed_out"] and res["hang"]["limit_s"] == 20
    assert res["after"]["not_started"] == "the check's limit of 20 s was spent"
    assert res["seconds"] < 20 + gpu_check.GRACE_S + 5


def test_a_stage_leaves_no_process_group_to_interpreter_teardown(tmp_path, capfd):
    """The stage's process shuts its groups down itself (the one it made too) and exits 0
    with nothing printed by interpreter teardown."""
    from seesaw_mcore.tools import gpu_check

    out = tmp_path / "g.json"
    stages = _stages(("groups", "leaves_groups", 120))
    gpu_check.main(["--quick", "--json", str(out)], stages)
    res = json.loads(out.read_text())
    assert res["groups"] == {"groups": 2, "sum": 1.0}  # no error: the process exited 0
    err = capfd.readouterr().err
    for noise in ("Exception ignored", "terminate called", "destroy_process_group",
                  "Traceback", "Warning"):
        assert noise not in err, err


def test_a_full_run_without_cuda_stops_at_once(capfd, monkeypatch):
    from seesaw_mcore.tools import gpu_check

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert gpu_check.main([]) == 2
    err = capfd.readouterr().err
    assert err == ("error: gpu-check needs a CUDA GPU (DS_ACCELERATOR=cpu); --quick runs the "
                   "smoke check on a CPU\n")


def test_host_copy_is_sized_by_dev_shm_or_skipped(tmp_path, monkeypatch):
    """The shared buffer takes at most half of /dev/shm's free space; below the smallest
    worth timing the stage says so instead of failing the check."""
    from collections import namedtuple

    from seesaw_mcore.tools import gpu_stages

    usage = namedtuple("usage", "total used free")
    mib = 2**20
    monkeypatch.setattr(gpu_stages.shutil, "disk_usage", lambda _p: usage(0, 0, 20 * mib))
    res = gpu_stages.host_copy_check(torch.device("cpu"), str(tmp_path), quick=True)
    assert res == {"skipped": "/dev/shm has 20 MiB free; timing the host tier's copies "
                              "needs 32 MiB"}
    monkeypatch.setattr(gpu_stages.shutil, "disk_usage", lambda _p: usage(0, 0, 40 * mib))
    res = gpu_stages.host_copy_check(torch.device("cpu"), str(tmp_path), quick=False)
    assert res["bytes"] == 20 * mib and res["pageable"]["h2d_gb_s"] > 0


def test_graphs_verdict_is_closeness_not_identity():
    """A near-tie flipped under capture (each side's token in the other's top logprobs) is
    close, and reported as not identical; a token outside the other's top-k fails."""
    from seesaw_mcore.tools.gpu_stages import graphs_verdict

    top = [{5: -0.1, 7: -0.1000001, 2: -3.0}, {1: -0.5, 3: -0.9}]
    eager = [([5, 1], top), ([4, 4], [{4: -0.1}, {4: -0.1}])]
    flipped = [([7, 3], [{7: -0.1, 5: -0.1000002, 2: -3.0}, {3: -0.2}]), eager[1]]
    assert graphs_verdict(flipped, eager) == {"graphs_close": "ok", "graphs_identical": "1/2"}
    assert graphs_verdict(eager, eager)["graphs_identical"] == "2/2"
    wrong = [([2, 1], [{2: -0.1, 9: -0.2}, {1: -0.5}]), eager[1]]
    assert graphs_verdict(wrong, eager)["graphs_close"].startswith(
        "FAIL: prompt 0 pos 0: reference 5 not in ours")


def test_gpu_check_quick_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = launch(1, ["seesaw_mcore.tools.gpu_check", "--quick", "--json", str(out)],
                  timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gpu-check: OK" in proc.stderr
    res = json.loads(out.read_text())
    assert res["failed_stages"] == [] and all(res["checks"].values()), res["checks"]
    assert res["kernel"]["path"] == "triton"  # the Triton kernel, under the interpreter
    assert res["kernel"]["max_abs_err_float32"] < 1e-4
    assert res["closeness_bf16"]["close"] == "ok"
    assert set(res["stage_limits_s"]) == {"versions", "kernel", "closeness_bf16", "throughput",
                                          "ops_per_decode_step", "host_copy", "seesaw_switch"}
    t = res["throughput"]
    assert t["graphs_close"] == "ok" and "graphs_identical" in t
    assert t["engine_graphs_tok_s"] > 0 and t["engine_eager_tok_s"] > 0 and t["hf_tok_s"] > 0
    assert res["versions"]["torch"] == torch.__version__
    assert set(res["host_copy"]) >= {"bytes", "pageable"}
    assert res["seesaw_switch"]["switch"].startswith("not run: a Seesaw plan needs two ranks")
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
