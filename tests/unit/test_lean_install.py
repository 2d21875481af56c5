"""The rehearsal's installer: one downloaded wheel at a time, a full disk named as such."""

from __future__ import annotations

import subprocess

import pytest

from seesaw_mcore.tools import lean_install


def _done(rc: int = 0, err: str = "") -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess([], rc, "", err)


def test_local_wheels_go_in_one_call_and_each_download_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(lean_install, "_pip", lambda args: calls.append(args) or _done())
    monkeypatch.setattr(lean_install, "_installed", lambda name, version: name == "have")
    wheels = [
        {"name": "a", "version": "1", "url": "file:///opt/a.whl"},
        {"name": "big", "version": "2", "url": "https://h/big.whl#sha256=00"},
        {"name": "have", "version": "3", "url": "https://h/have.whl"},
        {"name": "b", "version": "1", "url": "file:///opt/b.whl"},
        {"name": "huge", "version": "2", "url": "https://h/huge.whl"},
    ]
    lean_install.install(wheels)
    urls = [[a for a in c if "://" in a] for c in calls]
    assert urls == [["file:///opt/a.whl", "file:///opt/b.whl"],
                    ["https://h/big.whl#sha256=00"], ["https://h/huge.whl"]]
    assert all({"--no-deps", "--no-cache-dir"} <= set(c) for c in calls)


def test_a_full_disk_is_named_with_the_free_space(monkeypatch):
    err = "ERROR: Could not install packages due to an OSError: [Errno 28] No space left on device"
    monkeypatch.setattr(lean_install, "_pip", lambda args: _done(1, err))
    monkeypatch.setattr(lean_install, "_installed", lambda name, version: False)
    with pytest.raises(SystemExit) as exit_:
        lean_install.install([{"name": "torch", "version": "2.11.0", "url": "https://h/t.whl"}])
    assert str(exit_.value).startswith(
        "error: out of disk space while installing torch==2.11.0: ")
    assert "GiB free under" in str(exit_.value)


def test_another_pip_error_gives_its_last_line(monkeypatch):
    err = "WARNING: Location 'file:///x' is ignored\nERROR: No matching distribution found for q\n"
    monkeypatch.setattr(lean_install, "_pip", lambda args: _done(1, err))
    with pytest.raises(SystemExit) as exit_:
        lean_install.resolve(["q==9"])
    assert str(exit_.value) == ("error: pip failed while resolving q==9: "
                                "ERROR: No matching distribution found for q")
