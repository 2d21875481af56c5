"""LoRA adapters (issue 39): adapters made with ``peft`` itself on a tiny Llama (random,
non-zero A and B; all seven targets at rank 8, or three at rank 4 with rslora), greedy
tokens equal to HF ``PeftModel`` generate (and ``merge_and_unload``) under T1, T2, P2 and
P2:T2; a batch mixing two adapters and the base model; the prefix cache never serving one
adapter's blocks to another; an adapter-only ``update_weights``; the error lines."""

from __future__ import annotations

import json
import os

import pytest

from tests.conftest import launch_job
from tests.distributed.engine_job import MAX_TOKENS, PROMPTS

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name -> (base model, r, alpha, targets, rslora, seed)
    "a": ("llama", 8, 16, ALL, False, 1),
    "b": ("llama", 4, 8, ["q_proj", "v_proj", "down_proj"], True, 2),
    "c": ("llama", 8, 16, ALL, False, 3),
    "big": ("llama", 16, 16, ["q_proj"], False, 4),  # above max_lora_rank 8
    "other": ("qwen3", 4, 8, ["q_proj"], False, 5),  # another base model's shapes
    "head": ("llama", 4, 8, ["q_proj", "lm_head"], False, 6),
}


def make_adapters(models: dict[str, str], root: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    for name, (base, r, alpha, targets, rslora, seed) in ADAPTERS.items():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(models[base], dtype=torch.float32)
        peft = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                init_lora_weights=False, use_rslora=rslora))
        peft.save_pretrained(os.path.join(root, name))


def peft_greedy(base: str, adapter: str | None, merged: bool = False) -> list[list[int]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
        if merged:
            model = model.merge_and_unload()
    outs = []
    with torch.no_grad():
        for p in PROMPTS:
            ids = torch.tensor([p])
            g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               do_sample=False, max_new_tokens=MAX_TOKENS, eos_token_id=None,
                               pad_token_id=0)
            outs.append(g[0, len(p):].tolist())
    return outs


@pytest.fixture(scope="module")
def adapters(tiny_models, tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("adapters"))
    make_adapters(tiny_models, root)
    return root


@pytest.fixture(scope="module")
def reports(tiny_models, adapters, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lora")
    rep = launch_job(1, "tests.distributed.lora_job", out / "one.json",
                     [tiny_models["llama"], adapters, "T1"])
    rep |= launch_job(2, "tests.distributed.lora_job", out / "two.json",
                      [tiny_models["llama"], adapters, "T2", "P2", "P2:T2"], timeout=600)
    return rep


@pytest.fixture(scope="module")
def hf(tiny_models, adapters) -> dict:
    base = tiny_models["llama"]
    ref = {"base": peft_greedy(base, None)}
    for name in "abc":
        ref[name] = peft_greedy(base, os.path.join(adapters, name))
        assert peft_greedy(base, os.path.join(adapters, name), merged=True) == ref[name]
        assert ref[name] != ref["base"]  # the adapter changes the tokens
    return ref


PLANS = ["T1", "T2", "P2", "P2:T2"]


@pytest.mark.parametrize("plan", PLANS)
def test_adapters_generate_what_peft_generates(reports, hf, plan):
    r = reports[plan]
    for name in ("base", "a", "b", "c"):
        assert r[name] == hf[name], name
    if plan == "P2:T2":
        assert r["switches"] >= 4  # the adapters were re-cut at each switch


@pytest.mark.parametrize("plan", PLANS)
def test_a_batch_mixing_adapters_and_the_base_model(reports, hf, plan):
    r = reports[plan]
    want = [hf[k][i] for i, k in enumerate(["a", "base", "b", "a", "base", "b"])]
    assert r["mixed"] == want
    # after the errors, nothing changed: "a" still holds "c"'s tensors (its update)
    assert r["still_works"] == [hf[k][i] for i, k in enumerate(["c", "base", "b", "c", "base",
                                                                 "b"])]


@pytest.mark.parametrize("plan", PLANS)
def test_more_adapters_than_max_loras_run_in_turn(reports, hf, plan):
    assert reports[plan]["waves"] == [hf[k][i] for i, k in enumerate("abcabc")]


@pytest.mark.parametrize("plan", PLANS)
def test_the_prefix_cache_never_crosses_adapters(reports, plan):
    cached = reports[plan]["cached"]
    assert cached["a"][1] >= 32  # the second prompt hit the first's prefix, same adapter
    assert cached["b_after_a"][0] == 0  # a's blocks are not b's
    assert cached["b_after_a"][1] >= 32  # but b's own are
    if ":" not in plan:  # a static plan's cache outlives the call
        assert cached["b_again"][0] >= 32
    assert cached["base_after_b"][0] == 0
    shared = reports[plan]["shared"]
    assert shared["b_after_a"] == shared["b_again"] != shared["a"]


@pytest.mark.parametrize("plan", PLANS)
def test_adapter_only_update_equals_loading_the_new_adapter(reports, hf, plan):
    r = reports[plan]
    assert r["a_updated_to_c"] == r["c"] == hf["c"]


def test_error_lines(reports, adapters):
    for plan in PLANS:
        assert reports[plan]["errors"] == [
            "LoRA adapter 'big': its rank 16 is above max_lora_rank 8",
            f"LoRA adapter 'gone': {adapters}/no_such_adapter/adapter_config.json does not "
            "exist",
            "LoRA adapter 'other': base_model.model.model.layers.0.self_attn.q_proj.lora_B."
            "weight has shape [128, 4], this model's is [64, 4] (an adapter of another base "
            "model?)",
            "LoRA adapter 'head': target module 'lm_head' is not one this model's adapters "
            "can change (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
            "got 5 LoRA requests for 6 prompts",
            "update_weights: 'base_model.model.model.layers.9.mlp.gate_proj.lora_A.weight' is "
            "not a tensor of LoRA adapter 'c'",
            "update_weights: base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight "
            "must be a floating-point tensor of shape [8, 64] (LoRA adapter 'c'), got [1, 2]",
            "update_weights: LoRA adapter 'nope' is not loaded",
        ], plan


def test_peft_reference_is_not_trivial(hf):
    assert len({json.dumps(hf[k]) for k in ("base", "a", "b", "c")}) == 4


@pytest.fixture(scope="module")
def lora_server(tiny_models, adapters):
    from tests.distributed.test_server import Server

    server = Server(2, [f"model.path={tiny_models['llama']}", "plan=T2", "cache.num_blocks=64",
                        "cache.block_size=4", "dtype=float32", "lora.max_loras=1",
                        "lora.max_lora_rank=8", f"lora.path={adapters}/a", "lora.name=ada"])
    yield server
    server.kill()


def _complete(url: str, model: str, prompt: list[int]) -> tuple[int, list[int] | str]:
    import re

    import httpx

    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
        "ignore_eos": True, "logprobs": 0})  # (no tokenizer: tokens read "token_id:N")
    if r.status_code != 200:
        return r.status_code, r.json()["error"]["message"]
    return 200, [int(re.fullmatch(r"token_id:(\d+)", t).group(1))
                 for t in r.json()["choices"][0]["logprobs"]["tokens"]]


def test_server_serves_adapters_by_model_name(lora_server, hf, adapters):
    """A 2-rank server started with ``lora.path`` (as ``ada``), one adapter index: requests
    name an adapter as ``model``; ``/v1/load_lora_adapter`` adds one (loaded on both ranks),
    concurrent requests for two adapters take turns, ``/v1/unload_lora_adapter`` removes
    one; bad calls are one line each."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    url = lora_server.url
    models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
    assert models == ["llama", "ada"]
    assert _complete(url, "ada", PROMPTS[1]) == (200, hf["a"][1])
    assert _complete(url, "llama", PROMPTS[1]) == (200, hf["base"][1])
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "bee",
                                                         "lora_path": f"{adapters}/b"})
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'bee' added successfully.")
    with ThreadPoolExecutor(6) as pool:  # both adapters at once, one index: in turn
        jobs = [pool.submit(_complete, url, m, PROMPTS[i])
                for i, m in enumerate(["ada", "bee", "llama", "bee", "ada", "llama"])]
        got = [j.result() for j in jobs]
    want = [(200, hf[k][i]) for i, k in enumerate(["a", "b", "base", "b", "a", "base"])]
    assert got == want
    # SGLang's /generate names loaded adapters in lora_path (one per prompt here)
    r = httpx.post(f"{url}/generate", timeout=120, json={
        "input_ids": [PROMPTS[0], PROMPTS[2]], "lora_path": ["bee", None],
        "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0,
                            "ignore_eos": True}})
    assert [b["output_ids"] for b in r.json()] == [hf["b"][0], hf["base"][2]]
    bad = [("/v1/load_lora_adapter", {"lora_name": "big", "lora_path": f"{adapters}/big"},
            400, "LoRA adapter 'big': its rank 16 is above max_lora_rank 8"),
           ("/v1/load_lora_adapter", {"lora_name": "bee", "lora_path": f"{adapters}/b"},
            400, "The lora adapter 'bee' has already been loaded"),
           ("/unload_lora_adapter", {"lora_name": "nope"}, 404,  # (SGLang's path)
            "The lora adapter 'nope' cannot be found"),
           ("/generate", {"input_ids": [1, 2], "lora_path": "nope"}, 400,
            "lora_path 'nope' is not a loaded LoRA adapter (load it with /load_lora_adapter)")]
    for path, body, status, message in bad:
        r = httpx.post(url + path, json=body)
        assert (r.status_code, r.json()["error"]["message"]) == (status, message)
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "bee"})
    assert r.status_code == 200
    assert _complete(url, "bee", PROMPTS[0]) == (
        404, "The model `bee` does not exist (this server serves `llama`, `ada`)")
    assert _complete(url, "ada", PROMPTS[3]) == (200, hf["a"][3])


@pytest.fixture(scope="module")
def tiny_adapters(tmp_path_factory) -> str:
    """Two PEFT adapters (``ta``, ``tb``) of the bundled tokenizer model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.conftest import TINY

    root = tmp_path_factory.mktemp("tiny_adapters")
    for name, seed in (("ta", 1), ("tb", 2)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
        get_peft_model(model, LoraConfig(r=8, lora_alpha=32, init_lora_weights=False,
                                         target_modules=["q_proj", "v_proj", "o_proj",
                                                         "down_proj"])
                       ).save_pretrained(root / name)
    return str(root)


def test_infer_cli_lora_path_and_per_row_adapters(tmp_path, tiny_adapters):
    """``launch/infer.py`` on 2 ranks: ``lora.path`` for every row, a row's own
    ``lora_path`` instead, a row without ``lora_path`` field under the default; a missing
    adapter is that row's error line (exit 1, the others written)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.conftest import TINY, launch

    rows = [{"id": "x", "prompt": "hello there"},
            {"id": "y", "prompt": "hello there", "lora_path": f"{tiny_adapters}/tb"},
            {"id": "z", "prompt": "the cat", "lora_path": str(tmp_path / "none")}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = launch(2, ["launch.infer", f"data.input={tmp_path}/in.jsonl",
                      f"data.output={tmp_path}/out.jsonl", "plan=T2", "dtype=float32",
                      f"lora.path={tiny_adapters}/ta", "lora.max_lora_rank=8",
                      "sampling.max_tokens=8", "sampling.temperature=0",
                      "sampling.ignore_eos=true"], timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (f"error: {tmp_path}/in.jsonl: id 'z': LoRA adapter 'none': {tmp_path}/none/"
            "adapter_config.json does not exist") in proc.stderr
    out = {r["id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text()
                                   .splitlines())}
    assert sorted(out) == ["x", "y"]
    for rid, name in (("x", "ta"), ("y", "tb")):
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32),
            f"{tiny_adapters}/{name}")
        ids = torch.tensor([out[rid]["prompt_token_ids"]])
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  do_sample=False, max_new_tokens=8, eos_token_id=None,
                                  pad_token_id=0)[0, ids.shape[1]:].tolist()
        assert out[rid]["token_ids"] == want, rid
    assert out["x"]["token_ids"] != out["y"]["token_ids"]


def test_eval_cli_lora_path_equals_lm_evals_hf_backend_with_peft(tmp_path, tiny_adapters):
    """``launch/eval.py lora.path=`` on 2 ranks (T2) gives the same greedy generations and
    loglikelihoods as lm-eval's own ``hf`` backend with ``peft=`` the same adapter."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tests.conftest import TINY, launch
    from tests.distributed.lm_eval_job import summarize
    from tests.distributed.test_lm_eval import _task_dir

    tasks, env = _task_dir(tmp_path), {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    names = ["seesaw_mc", "seesaw_gen"]
    out = tmp_path / "ours.json"
    proc = launch(2, ["launch.eval", "plan=T2", f"model.path={TINY}", "dtype=float32",
                      f"lora.path={tiny_adapters}/ta", "lora.max_lora_rank=8",
                      f"eval.tasks=[{','.join(names)}]", f"eval.include_path={tasks}",
                      "eval.log_samples=true", f"eval.output={out}"], timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ours = summarize(json.loads(out.read_text()))
    for key, value in env.items():
        os.environ.setdefault(key, value)
    ref = json.loads(json.dumps(summarize(lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={TINY},dtype=float32,device=cpu,"
                               f"peft={tiny_adapters}/ta",
        tasks=names, task_manager=TaskManager(include_path=tasks), log_samples=True,
        random_seed=0, numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)),
        default=str))
    assert ours["samples"]["seesaw_gen"] == ref["samples"]["seesaw_gen"]
    for doc, choices in ref["samples"]["seesaw_mc"].items():
        for r, g in zip(choices, ours["samples"]["seesaw_mc"][doc]):
            assert abs(float(r[0][0]) - float(g[0][0])) < 1e-3

