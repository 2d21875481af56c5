"""Security checks ruff's ``S`` rules (run by ``make test``: pickle, eval/exec, shell=True,
os.system) do not make: weights are never unpickled (``torch.load`` only with
``weights_only=True``; HF reference models with ``use_safetensors=True``), the ruff gate itself
is on, and the Slurm script passes arguments as argv. (Owner-only tier files are checked in
test_host_tier.py / test_disk_tier.py.)"""

from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = [os.path.join(d, f) for top in ("seesaw_mcore", "launch")
           for d, _, files in os.walk(os.path.join(REPO, top)) for f in files if f.endswith(".py")]


def _calls(path: str):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: os.path.relpath(p, REPO))
def test_no_unsafe_calls(path):
    for node, name in _calls(path):
        where = f"{os.path.relpath(path, REPO)}:{node.lineno}"
        kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
        if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
            assert kw.get("weights_only") == "True", f"{where}: torch.load without weights_only"
        if name.endswith("AutoModelForCausalLM.from_pretrained"):
            assert kw.get("use_safetensors") == "True", f"{where}: may unpickle *.bin weights"


def test_ruff_security_rules_are_on():
    import tomllib

    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        lint = tomllib.load(f)["tool"]["ruff"]["lint"]
    assert {"S", "B", "F"} <= set(lint["select"])
    assert not {"S301", "S307", "S102", "S602", "S604", "S605"} & set(lint.get("ignore", []))


def test_slurm_script_passes_overrides_as_argv():
    text = open(os.path.join(REPO, "launch", "slurm", "infer.sbatch")).read()
    srun = [line for line in text.splitlines() if "srun" in line and not line.startswith("#")]
    assert srun == ['exec srun --kill-on-bad-exit=1 --cpu-bind=none "$PY" launch/infer.py "$@"']
    assert "eval" not in text and "bash -c" not in text
