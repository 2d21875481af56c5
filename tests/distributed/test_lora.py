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
