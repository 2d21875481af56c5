"""PEFT LoRA adapter folders read and checked against the model (``model/lora.py``): the
tensors by layer and module, PEFT's scaling (``lora_alpha / r``, rslora ``/ sqrt(r)``), and
every bad adapter a one-line error naming it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from seesaw_mcore.config import ModelConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model.lora import LoRARequest, load_adapter, target_shapes
from tests.conftest import TINY


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return ModelConfig.open(TINY)


def write(path, cfg: ModelConfig, r: int = 4, modules=("q_proj", "v_proj", "down_proj"),
          conf: dict | None = None, drop: str | None = None, shape_of: str | None = None):
    """A PEFT-format adapter folder (random non-zero A and B) for every layer of ``cfg``."""
    path.mkdir(parents=True, exist_ok=True)
    shapes = target_shapes(cfg)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in range(cfg.num_layers):
        for m in modules:
            out, inp = shapes.get(m, (8, 8))
            block = "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{block}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, inp, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out + (m == shape_of), r, generator=g)
    if drop:
        tensors.pop(drop)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    base = {"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": list(modules)}
    (path / "adapter_config.json").write_text(json.dumps({**base, **(conf or {})}))
    return str(path)


def test_reads_an_adapter_with_peft_scaling(tmp_path, cfg):
    req = LoRARequest("sql", 1, write(tmp_path / "a", cfg))
    ad = load_adapter(req, cfg, max_lora_rank=8)
    assert ad.rank == 4 and ad.scale == 16 / 4
    assert ad.modules == {"q_proj", "v_proj", "down_proj"}
    assert len(ad.weights) == 3 * cfg.num_layers
    a, b = ad.weights[(0, "down_proj")]
    assert a.shape == (4, cfg.intermediate_size) and b.shape == (cfg.hidden_size, 4)
    rs = load_adapter(LoRARequest("rs", 2, write(tmp_path / "b", cfg, conf={"use_rslora": True})),
                      cfg, 8)
    assert rs.scale == pytest.approx(16 / math.sqrt(4))


@pytest.mark.parametrize("case,message", [
    ("missing", "LoRA adapter 'x': {p}/adapter_config.json does not exist"),
    ("rank", "LoRA adapter 'x': its rank 16 is above max_lora_rank 8"),
    ("target", "LoRA adapter 'x': target module 'lm_head' is not one this model's adapters "
               "can change (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"),
    ("peft", "LoRA adapter 'x': peft_type is 'IA3', not LORA"),
    ("shape", "LoRA adapter 'x': base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight "
              "has shape [129, 4], this model's is [128, 4] (an adapter of another base model?)"),
    ("pair", "LoRA adapter 'x': layer 0 v_proj has lora_A without its pair"),
])
def test_bad_adapters_are_one_line_errors(tmp_path, cfg, case, message):
    p = tmp_path / "x"
    if case == "missing":
        p.mkdir()
    elif case == "rank":
        write(p, cfg, r=16)
    elif case == "target":
        write(p, cfg, modules=("q_proj",), conf={"target_modules": ["q_proj", "lm_head"]})
    elif case == "peft":
        write(p, cfg, conf={"peft_type": "IA3"})
    elif case == "shape":
        write(p, cfg, shape_of="q_proj")
    else:
        write(p, cfg, drop="base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
    with pytest.raises(SeesawError) as e:
        load_adapter(LoRARequest("x", 3, str(p)), cfg, max_lora_rank=8)
    assert str(e.value) == message.format(p=p)


def test_lora_int_id_must_be_positive():
    with pytest.raises(SeesawError, match="^LoRARequest 'a': lora_int_id must be an integer >= 1"):
        LoRARequest("a", 0, "/x")
