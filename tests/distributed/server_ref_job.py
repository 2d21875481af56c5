"""The in-process references test_server.py compares the server with, in one process (one
rank, T1): ``SPEC OUT``. SPEC is JSON ``{"cases": [{"name", "model", "prompts" | "chats",
"params"}], "lm_eval": {"model", "task_dir", "tasks"} | null}``; OUT gets, per case, each
prompt's samples (text, token ids, sampled-token logprobs, prompt logprobs) from
``LLM.generate`` / ``LLM.chat``, and the in-process ``seesaw`` lm-eval backend's responses."""

from __future__ import annotations

import json
import sys


def run_case(llm, case: dict) -> list[dict]:
    from seesaw_mcore import SamplingParams

    params = SamplingParams(**case["params"])
    if "chats" in case:
        outs = [llm.chat(c, params, use_tqdm=False)[0] for c in case["chats"]]
    else:
        prompts = [p if isinstance(p, str) else {"prompt_token_ids": p}
                   for p in case["prompts"]]
        outs = llm.generate(prompts, params, use_tqdm=False)
    return [{"prompt_token_ids": o.prompt_token_ids,
             "prompt_logprobs": None if o.prompt_logprobs is None else [
                 None if e is None else e[t].logprob
                 for e, t in zip(o.prompt_logprobs, o.prompt_token_ids)],
             "samples": [{"text": c.text, "token_ids": c.token_ids,
                          "finish_reason": c.finish_reason,
                          "logprobs": None if c.logprobs is None else [
                              e[t].logprob for e, t in zip(c.logprobs, c.token_ids)]}
                         for c in o.outputs]} for o in outs]


def main() -> None:
    spec_path, out = sys.argv[1:3]
    from seesaw_mcore import LLM
    from tests.distributed.lm_eval_job import evaluate

    with open(spec_path) as f:
        spec = json.load(f)
    report: dict = {"cases": {}}
    engines: dict[str, LLM] = {}
    for case in spec["cases"]:
        model = case["model"]
        if model not in engines:
            engines[model] = LLM(model, plan="T1", dtype="float32")
        report["cases"][case["name"]] = run_case(engines[model], case)
    for llm in engines.values():
        llm.close()
    ev = spec.get("lm_eval")
    if ev:
        report["lm_eval"] = evaluate("seesaw", ev["model"], ev["task_dir"])
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
