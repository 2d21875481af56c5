"""Errors at the command line: one clear line, non-zero exit, no hang, on every rank count."""

from __future__ import annotations

import shutil

from safetensors.torch import load_file, save_file

from tests.conftest import error_lines, launch


def test_world_size_mismatch_two_ranks(tiny_models):
    proc = launch(2, ["seesaw_mcore.tools.parity", "--model", tiny_models["llama"],
                      "--layouts", "T2P2"], timeout=180)
    assert proc.returncode != 0
    assert error_lines(proc) == [
        "error: layout T2P2 needs DP x TP x PP = 1 x 2 x 2 = 4 ranks, but the world size is 2"]


def test_missing_tensor_in_late_stage_two_ranks(tiny_models, tmp_path):
    """Only stage 1 would read the missing tensor; every rank still fails fast, identically."""
    dst = tmp_path / "m"
    shutil.copytree(tiny_models["llama"], dst)
    t = load_file(str(dst / "model.safetensors"))
    del t["model.layers.2.self_attn.o_proj.weight"]
    save_file(t, str(dst / "model.safetensors"))
    proc = launch(2, ["seesaw_mcore.tools.parity", "--model", str(dst), "--layouts", "P2",
                        "--prompt-ids", "[[1, 2, 3]]"],
                  timeout=180)
    assert proc.returncode != 0
    lines = error_lines(proc)
    assert len(lines) == 1 and lines[0].startswith(
        "error: tensor model.layers.2.self_attn.o_proj.weight is missing from the checkpoint")


def test_pp_greater_than_layers_single_process(tiny_models):
    proc = launch(1, ["seesaw_mcore.tools.parity", "--model", tiny_models["llama"],
                      "--layouts", "P4"], timeout=120)
    assert proc.returncode == 1
    assert error_lines(proc) == ["error: layout P4: PP=4 is greater than num_hidden_layers=3"]
