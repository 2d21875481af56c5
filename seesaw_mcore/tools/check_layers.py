"""Checks the package's import graph: no cycle, and no module imports a higher layer.

    python -m seesaw_mcore.tools.check_layers      # exit 1 and one line per violation

Layers, bottom to top (a module may import its own layer and any lower one)::

    0 base      errors, env, contract, config, sampling_params, jit_ops, quiet, mcore
    1 model, kv
    2 runtime
    3 engine
    4 planner
    5 api       llm, async_llm, io, serving, the package root (``from seesaw_mcore import
                LLM``), eval_harness
    6 bench     benchmarks (and the random checkpoints they and the tests build)
    7 tools     command-line tools (the GPU check runs benchmark code)

Every import counts, including those inside functions (a lazy import is still a
dependency) and those under ``if TYPE_CHECKING:``: a type-only import never runs, but a
module that names another's types in its signatures depends on it all the same, so a
circle through one is still a circle.
"""

from __future__ import annotations

import ast
import pathlib
import sys

PACKAGE = "seesaw_mcore"
LAYERS: dict[str, int] = {
    "errors": 0, "env": 0, "h2d": 0, "contract": 0, "config": 0, "sampling_params": 0, "jit_ops": 0,
    "mcore": 0,
    "quiet": 0,
    "model": 1, "kv": 1,
    "runtime": 2,
    "engine": 3,
    "planner": 4,
    "llm": 5, "async_llm": 5, "io": 5, "": 5,
    "eval_harness": 5, "serving": 5, "bench": 6, "tools": 7,
}


def layer_of(module: str) -> int:
    """The layer of a dotted module name inside the package."""
    parts = module.split(".")[1:]
    key = parts[0] if parts else ""
    if key not in LAYERS:
        raise KeyError(f"{module}: no layer assigned in check_layers.LAYERS")
    return LAYERS[key]


def import_graph(root: pathlib.Path) -> dict[str, set[str]]:
    """``{module: {imported package modules}}`` for every module under ``root``."""
    modules: dict[str, pathlib.Path] = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            graph[name].update(t for t in targets if t.split(".")[0] == PACKAGE
                               and t in modules and t != name)
    return graph


def violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per upward import and per cycle."""
    out = [f"upward import: {src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
           for src in sorted(graph) for dst in sorted(graph[src])
           if layer_of(dst) > layer_of(src)]
    state: dict[str, int] = {}  # 1: on the DFS stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                out.append("cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return out


def main() -> int:
    root = pathlib.Path(__file__).resolve().parents[1]
    graph = import_graph(root)
    bad = violations(graph)
    for line in bad:
        print(line)
    edges = sum(len(v) for v in graph.values())
    print(f"{len(graph)} modules, {edges} imports: "
          + (f"{len(bad)} violations" if bad else "acyclic, no upward import"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
