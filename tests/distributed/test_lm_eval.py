"""lm-evaluation-harness on the engine gives lm-eval's own HF backend's results on the same
model: a multiple-choice task (loglikelihoods within 1e-3, same argmax flags and accuracy),
a generation task (identical greedy generations) and a rolling-loglikelihood task, through
``lm_eval.simple_evaluate`` on one rank and through ``launch/eval.py`` on two (P2 -> T2,
from the same weights saved as a Megatron checkpoint);
the same results with prefix caching off, and with it on the multiple-choice contexts are
shared (the backend asks for the continuations' prompt logprobs only)."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import REPO, launch
from tests.distributed.lm_eval_job import TASKS, summarize

TINY = os.path.join(REPO, "models", "tiny-llama")
MC = [("Return the number of", ["bytes in the file.", "the function.", "apples."], 0),
      ("Raise an exception if", ["it is not available.", "blue.", "the value is None."], 2),
      ("Convert a string to", ["a list of tokens.", "seven.", "an integer."], 0),
      ("The default value is", ["None.", "green.", "the empty string."], 0)]
GEN = [("Return the number of", " the"), ("This module provides", " the"),
       ("If the file does not exist,", " it"), ("Create a new", " custom")]
PPL = ["Return the number of bytes in the file. If the file does not exist, raise an error.",
       "This module provides the following methods for reading and writing files."]


def _task_dir(root) -> str:
    rows = {"mc": [{"question": q, "choices": c, "answer": a} for q, c, a in MC],
            "gen": [{"prompt": p, "target": t} for p, t in GEN],
            "ppl": [{"text": t} for t in PPL]}
    for name, data in rows.items():
        with open(root / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in data)
    common = "dataset_path: json\ntest_split: train\n"
    tasks = {
        "seesaw_mc": "output_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
                     "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
                     "target_delimiter: ' '\nmetric_list:\n  - metric: acc\n",
        "seesaw_gen": "output_type: generate_until\ndoc_to_text: '{{prompt}}'\n"
                      "doc_to_target: '{{target}}'\ngeneration_kwargs:\n  until: ['.']\n"
                      "  max_gen_toks: 12\n  do_sample: false\n"
                      "metric_list:\n  - metric: exact_match\n",
        "seesaw_ppl": "output_type: loglikelihood_rolling\ndoc_to_text: ''\n"
                      "doc_to_target: '{{text}}'\nmetric_list:\n  - metric: word_perplexity\n",
    }
    for task, body in tasks.items():
        data = root / f"{task.split('_')[1]}.jsonl"
        (root / f"{task}.yaml").write_text(
            f"task: {task}\n{common}dataset_kwargs:\n  data_files:\n    train: {data}\n{body}")
    return str(root)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, megatron_checkpoints) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("lm_eval")
    tasks = _task_dir(root)
    path = root / "runs.json"  # hf, seesaw, seesaw nocache, the CLI's errors: one process
    proc = launch(1, ["tests.distributed.lm_eval_job", TINY, tasks, str(path)], timeout=500,
                  env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(path.read_text())
    path = root / "p2t2.json"
    # the command line on a Seesaw plan, from the demo model's Megatron checkpoint
    proc = launch(2, ["launch.eval", "plan=P2:T2", "model.format=megatron",
                      f"model.path={megatron_checkpoints}/demo", f"model.tokenizer={TINY}",
                      "dtype=float32",
                      f"eval.tasks=[{','.join(TASKS)}]", f"eval.include_path={tasks}",
                      "eval.log_samples=true", f"eval.output={path}"],
                  timeout=400, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "seesaw_mc" in proc.stdout  # rank 0's table
    out["seesaw P2:T2"] = summarize(json.loads(path.read_text()))
    return out


def _close(a, b) -> bool:
    """Equal structures; numbers (loglikelihoods) within 1e-4."""
    if isinstance(a, (list, tuple, dict)):
        if type(a) is not type(b) or len(a) != len(b):
            return False
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
        return all(_close(x, y) for x, y in zip(a, b))
    try:
        return abs(float(a) - float(b)) < 1e-4
    except (TypeError, ValueError):
        return a == b


def test_prefix_caching_shares_contexts_and_changes_no_result(runs):
    on, off = runs["seesaw"], runs["seesaw nocache"]
    assert on["results"] == off["results"]
    assert _close(on["samples"], off["samples"])
    assert on["prefix"]["cached"] > 0 and off["prefix"]["cached"] == 0
    assert on["prefix"]["prefill_tokens"] == off["prefix"]["prefill_tokens"]


@pytest.mark.parametrize("ours", ["seesaw", "seesaw P2:T2"])
def test_loglikelihoods_match_hf(runs, ours):
    ref, got = runs["hf"]["samples"]["seesaw_mc"], runs[ours]["samples"]["seesaw_mc"]
    assert ref.keys() == got.keys()
    for doc, choices in ref.items():
        for (r_ll, r_greedy), (g_ll, g_greedy) in zip(
                (c[0] for c in choices), (c[0] for c in got[doc])):
            assert abs(float(r_ll) - float(g_ll)) < 1e-3
            assert str(r_greedy) == str(g_greedy)
    assert runs[ours]["results"]["seesaw_mc"]["acc,none"] == \
        runs["hf"]["results"]["seesaw_mc"]["acc,none"]


@pytest.mark.parametrize("ours", ["seesaw", "seesaw P2:T2"])
def test_greedy_generations_match_hf(runs, ours):
    ref, got = runs["hf"]["samples"]["seesaw_gen"], runs[ours]["samples"]["seesaw_gen"]
    assert got == ref and any(r[0][0] for r in ref.values())  # not all empty


@pytest.mark.parametrize("ours", ["seesaw", "seesaw P2:T2"])
def test_rolling_loglikelihood_matches_hf(runs, ours):
    ref, got = runs["hf"]["samples"]["seesaw_ppl"], runs[ours]["samples"]["seesaw_ppl"]
    for doc in ref:
        assert abs(float(ref[doc][0][0]) - float(got[doc][0][0])) < 1e-3


def test_eval_cli_errors(runs):
    assert runs["cli_errors"] == ["error: eval.tasks is empty: name at least one lm-eval task",
                                  "error: unknown lm-eval task(s): no_such_task"]
