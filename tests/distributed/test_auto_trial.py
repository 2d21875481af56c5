"""``plan=auto``'s measured trial on two CPU ranks (one launch for the module): it picks the
truly fastest candidate when others are made slow, and never loses or duplicates an output
(a job shorter than the trial, a trial spanning two calls, no trial at all)."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, launch_job

TINY = f"{REPO}/models/tiny-llama"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auto")
    return launch_job(2, "tests.distributed.auto_job", tmp / "out.json",
                      [TINY, str(tmp / "cache")], timeout=400)


def test_trial_picks_the_one_candidate_not_slowed(report):
    slowed = report["slowed"]
    order, summary = slowed["order"], slowed["summary"]
    assert len(order) == 3 and len(set(order)) == 3
    # the first-run candidate sleeps 80 ms a step, the model's favourite (run last) 250 ms:
    # far wider than the plans' own step-time spread, also while other tests load the CPU
    assert summary["chosen"] == order[1] == slowed["plan"] == slowed["engine_plan"]
    measured = {c["plan"]: c["measured_tokens_per_s"] for c in summary["candidates"]}
    assert measured[order[1]] > measured[order[0]] > measured[order[2]]
    assert all(c["decode_steps"] == 7 for c in summary["candidates"])  # 1 unmeasured + 6


def test_trial_keeps_every_output_once_and_equal_to_a_static_run(report):
    outs = report["slowed"]["outputs"]
    assert [rid for rid, _ in outs] == [str(i) for i in range(40)]
    assert outs == report["reference"]  # greedy, fp32: the same tokens as plain T2


def test_job_shorter_than_the_trial_and_a_trial_over_two_calls(report):
    short = report["short"]
    assert [rid for rid, _ in short["outputs"]] == ["0", "1", "2"]
    assert all(len(toks[0]) == 4 for _, toks in short["outputs"])
    assert short["summary"]["chosen"] is None  # the trial waits for the next call
    second = report["second_call"]
    assert second["outputs"] == report["reference"]
    assert second["summary"]["chosen"] is not None


def test_no_trial_runs_the_models_pick(report):
    no = report["no_trial"]
    assert no["plan"] == no["favourite"] and not no["trial"]
    assert no["outputs"] == report["reference"][:4]
