"""lm-eval job run by test_lm_eval.py: ``MODE MODEL TASK_DIR OUT [KEY=VALUE ...]`` with MODE
``hf`` (lm-eval's own HF backend) or ``seesaw`` (``SeesawLM`` through
``lm_eval.simple_evaluate``, one rank, 4-token KV blocks, further ``LLM`` keywords as
``KEY=VALUE``: ``enable_prefix_caching=false``); writes metrics, per-document responses and
the engine's prefix-cache counters as JSON."""

from __future__ import annotations

import json
import sys

TASKS = ["seesaw_mc", "seesaw_gen", "seesaw_ppl"]


def main() -> None:
    mode, model, task_dir, out = sys.argv[1:5]
    extra = {k: v.lower() == "true" if v.lower() in ("true", "false") else v
             for k, v in (a.split("=", 1) for a in sys.argv[5:])}
    import lm_eval
    from lm_eval.tasks import TaskManager

    if mode == "hf":
        lm = "hf"
        args = f"pretrained={model},dtype=float32,device=cpu"
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
    with open(out, "w") as f:
        json.dump(summary, f, default=str)


def summarize(res: dict) -> dict:
    """Metrics and each document's responses, per task."""
    return {"results": res["results"],
            "samples": {t: {str(s["doc_id"]): s["resps"] for s in res["samples"][t]}
                        for t in res["samples"]}}


if __name__ == "__main__":
    main()
