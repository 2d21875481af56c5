"""A persistent generation worker for ``bench.vllm``: vLLM (run with the vLLM environment's
Python) or this engine (run with ours, one rank or several under the launcher).

    <vllm-env>/bin/python seesaw_mcore/bench/vllm_peer.py vllm WORKDIR MODEL [off]
    deepspeed --no_local_rank --num_gpus 2 seesaw_mcore/bench/vllm_peer.py \
        engine WORKDIR MODEL D2 [off]

(``off``: prefix caching off.) It loads the model once, writes ``WORKDIR/NAME.ready``, then
for each ``WORKDIR/NAME.go.I`` the driver writes (holding a workload's name) runs that
workload of ``WORKDIR/workloads.json`` and writes ``WORKDIR/NAME.done.I`` (seconds and
results); ``WORKDIR/NAME.stop`` ends it. Workloads:

- ``unique``: greedy completions of distinct prompts (``prompts``, ``max_tokens``);
- ``eval``: ``n`` sampled completions (``temperature``, ``top_p``) of each prompt;
- ``long``: one sampled completion of each prompt with ``repetition_penalty``;
- ``mc``: loglikelihoods of ``(context, continuation)`` pairs, the way lm-eval asks them
  (this engine: through its lm-eval backend, ``SeesawLM``; vLLM: as lm-eval's vLLM backend
  does, prompt logprobs of context + continuation).

Each run starts from an empty prefix cache (both engines' caches are reset). This file
imports neither package at module level, so either environment can run it.
"""

from __future__ import annotations

import json
import os
import sys
import time

# run as a script, this folder is sys.path[0]: its vllm.py (the driver) would shadow vLLM
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]


def _serve(work: str, name: str, run, is_driver: bool, barrier=lambda: None) -> None:
    """Runs ``run(workload) -> (results, stats or None)`` whenever the driver asks."""
    with open(os.path.join(work, "workloads.json")) as f:
        jobs = json.load(f)
    for job in jobs.values():  # warm-up (vLLM also compiles at start)
        run(_shrink(job))
    if is_driver:
        open(os.path.join(work, f"{name}.ready"), "w").close()
    i = 0
    while True:
        go, stop = os.path.join(work, f"{name}.go.{i}"), os.path.join(work, f"{name}.stop")
        while not (os.path.exists(go) or os.path.exists(stop)):
            time.sleep(0.02)
        barrier()
        if os.path.exists(stop):
            return
        with open(go) as f:
            job = jobs[f.read().strip()]
        t0 = time.perf_counter()
        results, stats = run(job)
        seconds = time.perf_counter() - t0
        if is_driver:
            tmp = os.path.join(work, f"{name}.done.{i}.tmp")
            with open(tmp, "w") as f:
                json.dump({"seconds": seconds, "results": results, "stats": stats}, f)
            os.replace(tmp, os.path.join(work, f"{name}.done.{i}"))
        i += 1


def _shrink(job: dict) -> dict:
    """A two-request version of ``job`` for the warm-up."""
    small = dict(job)
    for key in ("prompts", "pairs"):
        if key in small:
            small[key] = small[key][:2]
    small["max_tokens"] = min(job.get("max_tokens", 1), 4)
    return small


def serve_vllm(work: str, model: str, caching: bool) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(os.path.join(model, "config.json")) as f:
        context = json.load(f)["max_position_embeddings"]
    llm = LLM(model=model, dtype="float32", skip_tokenizer_init=True, seed=0,
              max_model_len=min(2048, context), enable_prefix_caching=caching)

    def run(job: dict):
        if caching:
            llm.reset_prefix_cache()  # every run starts cold, like this engine's
        if job["kind"] == "mc":  # lm-eval's vLLM backend: prompt_logprobs=1, max_tokens=1
            sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1,
                                detokenize=False)
            outs = llm.generate([TokensPrompt(prompt_token_ids=c + x) for c, x in job["pairs"]],
                                sp, use_tqdm=False)
            return [sum(o.prompt_logprobs[len(c) + j][t].logprob for j, t in enumerate(x))
                    for o, (c, x) in zip(outs, job["pairs"])], None
        sp = SamplingParams(n=job.get("n", 1), temperature=job.get("temperature", 0.0),
                            top_p=job.get("top_p", 1.0), max_tokens=job["max_tokens"],
                            repetition_penalty=job.get("repetition_penalty", 1.0),
                            ignore_eos=True, detokenize=False)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in job["prompts"]], sp,
                            use_tqdm=False)
        return [[list(c.token_ids) for c in o.outputs] for o in outs], None

    _serve(work, "vllm" if caching else "vllm-nocache", run, True)


def serve_engine(work: str, model: str, plan: str, caching: bool) -> None:
    import torch.distributed as dist

    from seesaw_mcore import SamplingParams
    from seesaw_mcore.eval_harness import SeesawLM

    lm = SeesawLM(model, plan=plan, dtype="float32", kv_cache_gib=1.0,
                  enable_prefix_caching=caching)
    llm = lm.llm

    def run(job: dict):
        llm.reset_prefix_cache()  # every run starts cold (a static plan's cache persists)
        st = llm.engine.stats
        before = (st.prefill_tokens, st.cached_tokens, st.switches)
        if job["kind"] == "mc":
            ll = lm._loglikelihood_tokens([(None, c, x) for c, x in job["pairs"]])
            results = [s for s, _ in ll]
        else:
            sp = SamplingParams(n=job.get("n", 1), temperature=job.get("temperature", 0.0),
                                top_p=job.get("top_p", 1.0), max_tokens=job["max_tokens"],
                                repetition_penalty=job.get("repetition_penalty", 1.0),
                                ignore_eos=True)
            outs = llm.generate([{"prompt_token_ids": p} for p in job["prompts"]], sp,
                                use_tqdm=False)
            results = [[c.token_ids for c in o.outputs] for o in outs]
        given, cached = st.prefill_tokens - before[0], st.cached_tokens - before[1]
        return results, {"prefill_tokens": given, "computed_tokens": given - cached,
                         "hit_rate": round(cached / given, 3) if given else 0.0,
                         "switches": st.switches - before[2]}

    name = f"engine-{plan}" + ("" if caching else "-nocache")
    _serve(work, name, run, llm.is_driver, dist.barrier)
    llm.shutdown()


if __name__ == "__main__":
    kind, work, model = sys.argv[1:4]
    if kind == "vllm":
        serve_vllm(work, model, sys.argv[4:5] != ["off"])
    else:
        serve_engine(work, model, sys.argv[4], sys.argv[5:6] != ["off"])
