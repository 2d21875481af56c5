"""Installs a set of pinned packages with the least disk: one wheel on disk at a time.

    PIP_CONSTRAINT= .venv-rehearsal/bin/python seesaw_mcore/tools/lean_install.py \\
        torch==2.11.0 triton==3.6.0 ...

``make gpu-rehearsal`` builds the device image's environment with it. A plain
``pip install torch==2.11.0`` (PyPI's CUDA build) downloads ~2.8 GB of wheels, keeps a
second copy in pip's cache, then unpacks ~4.9 GB: ~10 GB at its peak, which CI's disk did
not always have. Here pip resolves the whole set once without downloading a wheel
(``--dry-run --report``), then installs each resolved wheel by itself (``--no-deps``,
no cache), so the peak is what is installed plus the largest single wheel. Wheels that
lie on a local index are unpacked in place, so they go in one call.

Runs under the interpreter it installs into, with the standard library only (nothing
else is installed yet). Exit 1 with one line on any failure; a full disk is named as such,
with the free space left.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import NoReturn

_GIB = 1 << 30


def _free_gib(path: str) -> float:
    """Free space of the filesystem holding ``path``, in GiB."""
    return shutil.disk_usage(path).free / _GIB


def _pip(args: list[str]) -> subprocess.CompletedProcess:
    """Runs this interpreter's pip quietly, capturing its output."""
    cmd = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def _fail(what: str, result: subprocess.CompletedProcess) -> NoReturn:
    """Exits with one line: a full disk by name, else pip's last error line."""
    out = result.stdout + result.stderr
    free = _free_gib(sys.prefix)
    if "No space left on device" in out or "Errno 28" in out:
        sys.exit(f"error: out of disk space while {what}: {free:.1f} GiB free under "
                 f"{sys.prefix}")
    lines = [ln for ln in out.splitlines() if ln.strip() and "is ignored" not in ln]
    sys.exit(f"error: pip failed while {what}: {lines[-1] if lines else 'no output'}")


def resolve(requirements: list[str]) -> list[dict]:
    """Resolves ``requirements`` (with their dependencies) without downloading wheels.

    Returns:
        pip's report entries, one per distribution to install: ``name``, ``version``,
        ``url`` (with its ``#sha256=`` fragment where pip knows the hash).
    """
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        result = _pip(["install", "--dry-run", "--ignore-installed", "--no-cache-dir",
                       "--report", report, *requirements])
        if result.returncode != 0:
            _fail("resolving " + " ".join(requirements), result)
        with open(report) as f:
            entries = json.load(f)["install"]
    wheels = []
    for entry in entries:
        info = entry["download_info"]
        url = info["url"]
        digest = info.get("archive_info", {}).get("hashes", {}).get("sha256")
        wheels.append({"name": entry["metadata"]["name"],
                       "version": entry["metadata"]["version"],
                       "url": f"{url}#sha256={digest}" if digest else url})
    return wheels


def _installed(name: str, version: str) -> bool:
    """Whether this interpreter already has ``name`` at ``version`` (a rerun skips it)."""
    try:
        return importlib.metadata.version(name) == version
    except importlib.metadata.PackageNotFoundError:
        return False


def install(wheels: list[dict]) -> None:
    """Installs resolved wheels: local ones in one call, each downloaded one alone."""
    todo = [w for w in wheels if not _installed(w["name"], w["version"])]
    local = [w for w in todo if w["url"].startswith("file:")]
    remote = [w for w in todo if not w["url"].startswith("file:")]
    batches = ([local] if local else []) + [[w] for w in remote]
    base = ["install", "--no-deps", "--no-cache-dir", "--no-compile"]
    for batch in batches:
        what = "installing " + ", ".join(f"{w['name']}=={w['version']}" for w in batch)
        result = _pip(base + [w["url"] for w in batch])
        if result.returncode != 0:
            _fail(what, result)


def main(argv: list[str]) -> None:
    """Resolves and installs ``argv``'s requirements into this interpreter."""
    if not argv or any(a.startswith("-") for a in argv):
        sys.exit("usage: python lean_install.py REQUIREMENT [REQUIREMENT ...]")
    before = _free_gib(sys.prefix)
    wheels = resolve(argv)
    install(wheels)
    print(f"lean_install: {len(wheels)} distributions ({len(argv)} asked for) into "
          f"{sys.prefix}; {before:.1f} -> {_free_gib(sys.prefix):.1f} GiB free")


if __name__ == "__main__":
    main(sys.argv[1:])
