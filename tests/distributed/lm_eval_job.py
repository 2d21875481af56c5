"""lm-eval job run by test_lm_eval.py in one process (one rank): ``MODEL TASK_DIR OUT``.
Runs lm-eval's own HF backend, the ``seesaw`` backend (``SeesawLM`` through
``lm_eval.simple_evaluate``, 4-token KV blocks) with prefix caching on and off, and
``launch/eval.py``'s error cases (composed by Hydra as its command line does); writes
metrics, per-document responses, the engine's prefix-cache counters and the error lines as
JSON ``{"hf", "seesaw", "seesaw nocache", "cli_errors"}``."""

from __future__ import annotations

import json
import os
import sys

TASKS = ["seesaw_mc", "seesaw_gen", "seesaw_ppl"]
CLI_ERRORS = [[], ["eval.tasks=[no_such_task]"]]  # overrides of launch/eval.py


def evaluate(mode: str, model: str, task_dir: str, **extra) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    if mode == "hf":
        lm, args = "hf", f"pretrained={model},dtype=float32,device=cpu"
    else:
        from seesaw_mcore.eval_harness import SeesawLM

        lm, args = SeesawLM(model, plan="T1", dtype="float32", block_size=4, **extra), None
    res = lm_eval.simple_evaluate(model=lm, model_args=args, tasks=TASKS,
                                  task_manager=TaskManager(include_path=task_dir),
                                  log_samples=True, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    summary = summarize(res)
    if mode != "hf":
        st = lm.llm.engine.stats
        summary["prefix"] = {"prefill_tokens": st.prefill_tokens, "cached": st.cached_tokens}
        lm.llm.close()
    return summary


def cli_errors() -> list[str]:
    """``launch/eval.py``'s one-line error for each of ``CLI_ERRORS``."""
    from hydra import compose, initialize_config_dir

    from seesaw_mcore.errors import SeesawError
    from tests.conftest import REPO

    sys.path.insert(0, os.path.join(REPO, "launch"))
    import eval as eval_cli  # launch/eval.py

    lines = []
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        for overrides in CLI_ERRORS:
            try:
                eval_cli.run(compose("eval", overrides=overrides))
                lines.append("no error")
            except SeesawError as e:  # as eval.main prints it
                lines.append(f"error: {e}")
    return lines


def summarize(res: dict) -> dict:
    """Metrics and each document's responses, per task."""
    return {"results": res["results"],
            "samples": {t: {str(s["doc_id"]): s["resps"] for s in res["samples"][t]}
                        for t in res["samples"]}}


def main() -> None:
    model, task_dir, out = sys.argv[1:4]
    report = {"hf": evaluate("hf", model, task_dir),
              "seesaw": evaluate("seesaw", model, task_dir),
              "seesaw nocache": evaluate("seesaw", model, task_dir,
                                         enable_prefix_caching=False),
              "cli_errors": cli_errors()}
    with open(out, "w") as f:
        json.dump(report, f, default=str)


if __name__ == "__main__":
    main()
