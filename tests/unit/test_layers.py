"""The import graph: acyclic, no upward import (tools/check_layers.py), and the checker finds
both kinds of violation."""

from __future__ import annotations

import pathlib
import subprocess
import sys

from seesaw_mcore.tools import check_layers

ROOT = pathlib.Path(check_layers.__file__).resolve().parents[1]


def test_package_is_layered():
    graph = check_layers.import_graph(ROOT)
    assert check_layers.violations(graph) == []
    assert "seesaw_mcore.contract" in graph and graph["seesaw_mcore.contract"] == set()


def test_checker_finds_upward_imports_and_cycles():
    graph = {"seesaw_mcore.kv.a": {"seesaw_mcore.engine.b"},
             "seesaw_mcore.engine.b": {"seesaw_mcore.engine.c"},
             "seesaw_mcore.engine.c": {"seesaw_mcore.engine.b"}}
    assert check_layers.violations(graph) == [
        "upward import: seesaw_mcore.kv.a (layer 1) imports seesaw_mcore.engine.b (layer 3)",
        "cycle: seesaw_mcore.engine.b -> seesaw_mcore.engine.c -> seesaw_mcore.engine.b",
    ]


def test_contract_and_api_types_import_without_torch():
    code = ("import sys; from seesaw_mcore import SamplingParams, EngineConfig, RequestOutput; "
            "import seesaw_mcore.contract; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_cli_exit_status():
    out = subprocess.run([sys.executable, "-m", "seesaw_mcore.tools.check_layers"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "acyclic, no upward import" in out.stdout
