"""What the benchmark tools share: the machine line and how results are reported."""

from __future__ import annotations

import json
import os
import platform

import torch


def machine(threads: str) -> str:
    """``x86_64 2 cores, torch 2.13.0+cpu, <threads>``."""
    return f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, {threads}"


def emit(results: dict, path: str | None) -> None:
    """Prints ``results`` as JSON and writes them to ``path`` when given."""
    print(json.dumps(results, indent=2))
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
