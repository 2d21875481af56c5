"""Resumable output: complete records kept, a torn last line cut off, a bad record in the
middle refused, overwrite starts over."""

from __future__ import annotations

import json

import pytest

from seesaw_mcore.errors import SeesawError
from seesaw_mcore.io import OutputWriter


def _rec(i: int) -> str:
    return json.dumps({"id": f"p{i}", "text": "x" * i}) + "\n"


def test_keeps_complete_records_and_cuts_a_torn_line(tmp_path):
    path = tmp_path / "out.jsonl"
    good = _rec(0) + _rec(1)
    path.write_text(good + _rec(2)[:7])  # killed while writing p2
    w = OutputWriter(str(path))
    assert w.done == {"p0", "p1"} and w.dropped_bytes == 7
    assert path.read_text() == good  # cut back to the last complete record
    w.close()


def test_complete_file_and_empty_file(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(_rec(0) + _rec(1))
    w = OutputWriter(str(path))
    assert w.done == {"p0", "p1"} and w.dropped_bytes == 0
    w.close()
    (tmp_path / "empty.jsonl").write_text("")
    assert OutputWriter(str(tmp_path / "empty.jsonl")).done == set()


def test_bad_record_in_the_middle_is_refused(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(_rec(0) + "not json\n" + _rec(2))
    with pytest.raises(SeesawError, match=f"^data.output {path}:2 is not a record of this "
                                          f"tool; fix it or set data.overwrite=true$"):
        OutputWriter(str(path))


def test_overwrite_starts_over(tmp_path):
    path = tmp_path / "out.jsonl"
    path.write_text(_rec(0))
    w = OutputWriter(str(path), overwrite=True)
    assert w.done == set() and path.read_text() == ""
    w.close()
