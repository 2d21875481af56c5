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


ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_stage_cuts_sum_to_the_full_update(tmp_path, cfg, tp, pp):
    """Each linear's adapter term, cut for every (TP, PP) rank and run through
    ``ActiveLoRA`` (column-parallel outputs concatenated, row-parallel partial sums added),
    equals ``scale x B A x`` of the full adapter, per target; rows of another adapter and
    of the base model get their own term or none."""
    from seesaw_mcore.config import split_layers
    from seesaw_mcore.model.lora_layers import (
        LINEARS,
        ROW_PARALLEL,
        ActiveLoRA,
        LoRABatch,
        stage_lora,
    )
    from seesaw_mcore.model.params import ShardSpec

    a = load_adapter(LoRARequest("a", 1, write(tmp_path / "a", cfg, r=4, modules=ALL_TARGETS)),
                     cfg, 8)
    b = load_adapter(LoRARequest("b", 2, write(tmp_path / "b", cfg, r=2,
                                               modules=("k_proj", "down_proj"))), cfg, 8)
    shapes = target_shapes(cfg)
    g = torch.Generator().manual_seed(1)
    indices, qlens = [1, 0, 2, 1], [3, 1, 2, 1]  # rows: a a a, base, b b, a
    owner = [i for i, n in zip(indices, qlens) for _ in range(n)]
    for pp_rank in range(pp):
        start, _ = split_layers(cfg.num_layers, pp)[pp_rank]
        stages = [stage_lora({1: a, 2: b}, cfg, ShardSpec(tp, r, pp, pp_rank), 2, 8,
                             torch.float64, torch.device("cpu")) for r in range(tp)]
        for (j, linear), _ in stages[0].weights.items():
            layer, targets = start + j, LINEARS[linear]
            inp = shapes[targets[0]][1]
            x = torch.randn(len(owner), inp, generator=g, dtype=torch.float64)
            want = []
            for m in targets:
                rows = []
                for idx in owner:
                    ad = {1: a, 2: b}.get(idx)
                    w = ad.weights.get((layer, m)) if ad else None
                    rows.append(torch.zeros(shapes[m], dtype=torch.float64) if w is None
                                else ad.scale * (w[1].double() @ w[0].double()))
                want.append(torch.stack(rows))  # [T, out, in] per target
            got_parts = []
            for r, stage in enumerate(stages):
                n_in = inp // tp if linear in ROW_PARALLEL else inp
                xs = x[:, r * n_in:(r + 1) * n_in] if linear in ROW_PARALLEL else x
                out_rows = stage.weights[(j, linear)][1].shape[1]
                out = torch.zeros(len(owner), out_rows, dtype=torch.float64)
                ActiveLoRA(stage, LoRABatch.build(indices, qlens, torch.device("cpu"))).add(
                    j, linear, xs, out)
                got_parts.append(out)
            if linear in ROW_PARALLEL:
                got = sum(got_parts)
                full = torch.einsum("toi,ti->to", want[0], x)
                torch.testing.assert_close(got, full)
            else:  # each rank: its slice of every target's output rows, in target order
                for r, part_out in enumerate(got_parts):
                    at = 0
                    for m, w in zip(targets, want):
                        n = shapes[m][0] // tp
                        full = torch.einsum("toi,ti->to", w, x)[:, r * n:(r + 1) * n]
                        torch.testing.assert_close(part_out[:, at:at + n], full)
                        at += n


def test_updated_takes_saved_and_live_peft_names(tmp_path, cfg):
    from seesaw_mcore.model.lora import updated

    ad = load_adapter(LoRARequest("a", 1, write(tmp_path / "a", cfg)), cfg, 8)
    new_a, new_b = torch.ones(4, cfg.hidden_size), torch.full((cfg.hidden_size, 4), 2.0)
    base = "base_model.model.model.layers.1.self_attn.q_proj"
    got = updated(ad, [(f"{base}.lora_A.weight", new_a), (f"{base}.lora_B.default.weight",
                                                           new_b)])
    assert torch.equal(got.weights[(1, "q_proj")][0], new_a)
    assert torch.equal(got.weights[(1, "q_proj")][1], new_b)
    assert torch.equal(ad.weights[(1, "q_proj")][0], load_adapter(
        LoRARequest("a", 1, str(tmp_path / "a")), cfg, 8).weights[(1, "q_proj")][0])  # a copy
    with pytest.raises(SeesawError, match=r"^update_weights: 'base_model.model.model.layers.1."
                       r"self_attn.k_proj.lora_A.weight' is not a tensor of LoRA adapter 'a'$"):
        updated(ad, [(f"{base}.lora_A.weight", new_a),
                     ("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight", new_a)])


def test_padded_batched_matmul_equals_the_per_adapter_loop(tmp_path, cfg):
    """Three or more adapters in a micro-batch run as one padded ``bmm`` pair; the result
    equals one matmul pair per adapter (the path tiles and two-adapter batches take)."""
    from seesaw_mcore.model.lora_layers import ActiveLoRA, LoRABatch, stage_lora
    from seesaw_mcore.model.params import ShardSpec

    ads = {i: load_adapter(LoRARequest(n, i, write(tmp_path / n, cfg, r=r,
                                                   modules=ALL_TARGETS)), cfg, 8)
           for i, (n, r) in enumerate((("a", 4), ("b", 2), ("c", 8)), 1)}
    stage = stage_lora(ads, cfg, ShardSpec(2, 1, 1, 0), 3, 8, torch.float64,
                       torch.device("cpu"))
    indices, qlens = [1, 2, 3, 0, 1, 3, 3], [1, 1, 1, 1, 1, 1, 1]
    batch = LoRABatch.build(indices, qlens, torch.device("cpu"))
    assert batch.padded is not None and batch.padded.m == 3
    g = torch.Generator().manual_seed(2)
    for (j, linear), (a_all, b_all) in stage.weights.items():
        x = torch.randn(len(indices), a_all.shape[2], generator=g, dtype=torch.float64)
        padded = torch.zeros(len(indices), b_all.shape[1], dtype=torch.float64)
        ActiveLoRA(stage, batch).add(j, linear, x, padded)
        looped = torch.zeros_like(padded)
        ActiveLoRA(stage, LoRABatch(batch.groups)).add(j, linear, x, looped)
        torch.testing.assert_close(padded, looped)
        assert not padded[3].any() and padded[0].any()  # the base row has no term
