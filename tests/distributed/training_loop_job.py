"""The post-training-loop job run by test_training_loop.py under the launcher, per plan:

- update_weights: an engine on checkpoint A generates, takes checkpoint B's tensors (all at
  once, then again from A and back to B in two partial halves), and generates again; bad
  updates are refused and change nothing.
- Megatron checkpoints (written by ``megatron_writer.py``) generate.
- sleep / wake_up on a model with a measurable footprint: the memory returned (RSS), the
  outputs after waking, the errors while asleep.

The Seesaw plan's host tier is small enough to switch several times per call. Rank 0 writes
JSON."""

from __future__ import annotations

import json
import os
import sys

from safetensors.torch import load_file

from seesaw_mcore import LLM, SamplingParams
from seesaw_mcore.errors import SeesawError
from tests.distributed.engine_job import MAX_TOKENS, PROMPTS


def tensors(path: str) -> list[tuple[str, object]]:
    """A checkpoint's tensors as a trainer would hand them over (full, HF names)."""
    out: dict = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return sorted(out.items())


def from_trainer(llm, path: str, weights, run, log: str) -> list:
    """``update_weights_from_distributed`` from ``trainer_stub.py`` (rank 0 starts it, its
    output to ``log``); returns the greedy outputs after it."""
    import subprocess

    import torch.distributed as dist

    from tests.conftest import free_test_port

    box = [free_test_port()]  # not an ephemeral port: another job's gloo may take that
    dist.broadcast_object_list(box, src=0)
    world = dist.get_world_size() + 1
    trainer = None
    if dist.get_rank() == 0:
        with open(log, "w") as f:
            trainer = subprocess.Popen([sys.executable, "-m", "tests.distributed.trainer_stub",
                                        "127.0.0.1", str(box[0]), str(world), path],
                                       stdout=f, stderr=subprocess.STDOUT)
    llm.init_weight_update_group("127.0.0.1", box[0], rank_offset=1, world_size=world)
    llm.update_weights_from_distributed([n for n, _ in weights],
                                        [str(t.dtype).split(".")[1] for _, t in weights],
                                        [tuple(t.shape) for _, t in weights])
    if trainer is not None:
        code = trainer.wait(timeout=60)
        with open(log) as f:
            assert code == 0, f"trainer stub exited {code}:\n{f.read()[-3000:]}"
    return run()


def rss() -> int:
    """This process's resident memory, bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def megatron(plan: str, root: str, qwen2: str, greedy, prompts) -> dict:
    """Greedy outputs of the two Megatron checkpoints under ``plan``."""
    kw = {"host_kv_tokens": 48} if ":" in plan else {}
    rep = {}
    cases = [("llama", os.path.join(root, "llama_root"), {})]
    if plan in ("T1", "P2:T2"):
        cases.append(("qwen2", os.path.join(root, "qwen2_tp2"), {"hf_config_path": qwen2}))
    for name, path, extra in cases:
        llm = LLM(path, plan=plan, num_blocks=48, block_size=4, **kw, **extra)
        assert llm.engine.model_cfg.format == "megatron"
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        rep[name] = [o.outputs[0].token_ids for o in outs]
        llm.close()
    return rep


def sleep_cycle(plan: str, wide: str) -> dict:
    """sleep(1) / wake_up, sleep(2) / wake_up(weights) / update / wake_up(kv_cache), with
    rank 0's RSS around each sleep and the outputs after each wake."""
    kw = {"host_kv_tokens": 64} if ":" in plan else {}
    llm = LLM(wide, plan=plan, kv_cache_gib=0.25, **kw)
    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [{"prompt_token_ids": [1, 2, 3, 4, 5, 6, 7, 8, 9]}, {"prompt_token_ids": [7, 8]}]

    def run() -> list:
        return [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]

    def error(fn, *args) -> str | None:
        try:
            fn(*args)
        except SeesawError as e:
            return str(e)
        return None

    runner = llm.engine.executor.runner
    rep = {"before": run(), "kv_bytes": runner.kv_cache_bytes,
           "weight_bytes": runner.store.unique_bytes}
    rss0 = rss()
    llm.sleep(1)
    rep["freed_1"] = rss0 - rss()
    rep["asleep_error"] = error(run)
    rep["update_asleep_error"] = error(llm.update_weights, [])
    llm.wake_up()
    rep["after_1"] = run()
    rss1 = rss()
    llm.sleep(2)
    rep["freed_2"] = rss1 - rss()
    rep["bad_tag_error"] = error(llm.wake_up, ["kv"])
    llm.wake_up(["weights"])
    llm.wake_up(["kv_cache"])
    rep["discarded_error"] = error(run)
    llm.update_weights(tensors(wide))
    rep["after_2"] = run()
    llm.close()
    return rep


CLI_PROMPTS = ["Return the number of", "This module provides", "If the file does not exist,"]


def cli_on_megatron(plan: str, demo: str, tiny: str, folder: str) -> dict:
    """``launch/infer.py model.format=megatron model.path=<demo> model.tokenizer=<tiny>``
    (composed by Hydra as the command line does, run in this job's ranks), and the API's
    greedy texts for the same prompts from the HF folder. Shuts the process groups down:
    the job's last step."""
    from hydra import compose, initialize_config_dir

    from tests.conftest import REPO

    sys.path.insert(0, os.path.join(REPO, "launch"))
    import infer  # launch/infer.py

    llm = LLM(tiny, plan=plan, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=12)
    expected = [o.outputs[0].text for o in llm.generate(CLI_PROMPTS, params, use_tqdm=False)]
    llm.close()
    src, out = os.path.join(folder, "in.jsonl"), os.path.join(folder, "out.jsonl")
    if llm.is_driver:
        with open(src, "w") as f:
            f.writelines(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                         for i, p in enumerate(CLI_PROMPTS))
    overrides = [f"plan={plan}", "model.format=megatron", f"model.path={demo}",
                 f"model.tokenizer={tiny}", "dtype=float32", f"data.input={src}",
                 f"data.output={out}", "sampling.temperature=0", "sampling.max_tokens=12"]
    import torch.distributed as dist

    dist.barrier()  # the input file exists
    with initialize_config_dir(config_dir=os.path.join(REPO, "conf"), version_base="1.3"):
        code = infer.run(compose("infer", overrides=overrides))
    if not llm.is_driver:
        return {}
    with open(out) as f:
        got = {r["id"]: r["outputs"][0]["text"] for r in map(json.loads, f)}
    return {"code": code, "expected": expected, "got": [got[f"p{i}"]
                                                      for i in range(len(CLI_PROMPTS))]}


def main() -> None:
    models, out_path, plans = sys.argv[1], sys.argv[2], sys.argv[3:]
    a, b, qwen2, megatron_root, wide, tiny = models.split(",")
    wa, wb = tensors(a), tensors(b)
    greedy = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    report = {}
    for plan in plans:
        kw = {"host_kv_tokens": 48} if ":" in plan else {}
        llm = LLM(a, plan=plan, num_blocks=48, block_size=4, **kw)

        def run(llm=llm):
            outs = llm.generate(prompts, greedy, use_tqdm=False)
            return [o.outputs[0].token_ids for o in outs]

        rep = {"before": run()}
        llm.update_weights(wb)
        rep["after"] = run()
        rep["switches"] = llm.engine.stats.switches
        errors = []
        norm, embed = dict(wb)["model.norm.weight"], dict(wb)["model.embed_tokens.weight"]
        for bad in ([("model.norm.weight", 2 * norm), ("nope.weight", norm)],  # valid, bad
                    [("model.embed_tokens.weight", embed[:1])],
                    [("model.norm.weight", norm.long())]):
            try:
                llm.update_weights(bad)
                errors.append(None)
            except SeesawError as e:
                errors.append(str(e))
        rep["errors"] = errors
        rep["after_refused"] = run()  # nothing changed
        llm.update_weights(wa)
        rep["back_to_a"] = run()
        half = len(wb) // 2
        llm.update_weights(wb[:half])  # a partial update, then the rest
        llm.update_weights(wb[half:])
        rep["halves"] = run()
        if plan in ("T1", "P2:T2"):  # from a trainer process, over a group made for it
            llm.update_weights(wa)
            rep["distributed"] = from_trainer(llm, b, wb, run,
                                             f"{out_path}.trainer.log")
        llm.close()
        rep["megatron"] = megatron(plan, megatron_root, qwen2, greedy, prompts)
        if plan in ("T1", "P2:T2"):
            rep["sleep"] = sleep_cycle(plan, wide)
        report[plan] = rep
    cli_plan = "P2:T2" if "P2:T2" in plans else "T1"
    report[f"cli {cli_plan}"] = cli_on_megatron(cli_plan, os.path.join(megatron_root, "demo"),
                                                tiny, os.path.dirname(out_path))
    if llm.is_driver:
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
