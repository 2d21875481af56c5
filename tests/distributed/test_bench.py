"""The benchmark suite's smoke test: the bundled tiny model, one static and one Seesaw plan,
HF generate, a two-point sweep; ``results.json`` has every field and the three plots are
valid PNGs (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, launch

RUN_FIELDS = {"wall_s", "requests_per_s", "output_tokens_per_s", "total_tokens_per_s",
              "peak_rss_mb"}
ENGINE_FIELDS = RUN_FIELDS | {"prefill_s", "decode_s", "switch_s", "switches", "preemptions",
                              "tier_copy_s", "tier_wait_s"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = launch(2, ["seesaw_mcore.bench", "plans.static=[T2]", "plans.seesaw=[P2:T2]",
                      "plans.auto=false", "workloads=[sharegpt]", "num_requests=6",
                      "sweep.ratios=[0.0,0.3]", "sweep.num_requests=3", "sweep.input_len=64",
                      f"output_dir={out}"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_results_have_every_field(bench):
    out, _ = bench
    res = json.loads((out / "results.json").read_text())
    assert {"machine", "config", "model", "model_params", "world_size", "plans", "runs",
            "summary", "timeline", "sweep", "plots"} <= set(res)
    kinds = {r["plan"]: r["kind"] for r in res["runs"]}
    assert kinds == {"T2": "static", "P2 -> T2": "seesaw", "HF generate": "hf"}
    for r in res["runs"]:
        need = RUN_FIELDS if r["kind"] == "hf" else ENGINE_FIELDS
        assert need <= set(r), need - set(r)
        assert len(r["peak_rss_mb"]) == (1 if r["kind"] == "hf" else 2)
    seesaw = next(r for r in res["runs"] if r["kind"] == "seesaw")
    assert seesaw["switches"] >= 1
    summary = res["summary"]["sharegpt"]
    assert summary["best_static"] == "T2" and summary["ratio_to_best_static"]["T2"] == 1.0
    assert set(summary["ratio_to_best_static"]) == {"T2", "P2 -> T2", "HF generate"}
    events = res["timeline"]["events"]
    assert res["timeline"]["plan"] == "P2 -> T2" and any(e["switch"] for e in events)
    assert {"t", "phase", "switch", "num_seqs", "num_tokens", "tier_usage"} == set(events[0])
    assert {(r["ratio"], r["plan"]) for r in res["sweep"]["runs"]} == {
        (0.0, "T2"), (0.0, "P2 -> T2"), (0.3, "T2"), (0.3, "P2 -> T2")}


def test_plots_are_valid_pngs(bench):
    import matplotlib.image

    out, _ = bench
    for name in ("throughput.png", "timeline.png", "sweep.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(out / name)
        assert img.shape[0] > 100 and img.shape[1] > 100


def test_prints_ratio_table(bench):
    _, proc = bench
    assert "== sharegpt: best static T2 ==" in proc.stdout
    assert "vs best static" in proc.stdout


def test_plans_bench_measures_every_plan_and_auto(tmp_path):
    """``bench.plans`` on the tiny model: every valid 2-rank plan, ``plan=auto`` with and
    without its trial, the model's ranking and Spearman per workload (no timing
    assertions)."""
    out = tmp_path / "plans.json"
    proc = launch(2, ["seesaw_mcore.bench.plans", "--model", f"{REPO}/models/tiny-llama",
                      "--num-prompts", "12", "--length-scale", "0.1", "--workloads", "sharegpt",
                      "--json", str(out)], timeout=400, env={"SEESAW_CACHE_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    wl = res["workloads"]["sharegpt"]
    assert {r["plan"] for r in wl["plans"]} == {"T2", "D2", "P2", "P2:T2", "T2:P2"}
    assert all(r["measured_tokens_per_s"] > 0 and r["predicted_tokens_per_s"] > 0
               for r in wl["plans"])
    assert -1 <= wl["spearman"] <= 1 and wl["best"] == wl["plans"][0]["plan"]
    auto, plain = wl["auto"]["auto"], wl["auto"]["auto (no trial)"]
    assert auto["trial"] is not None and plain["trial"] is None
    assert auto["vs_best"] > 0 and plain["plan"] in {r["plan"] for r in wl["plans"]}
