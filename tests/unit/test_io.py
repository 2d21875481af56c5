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


ROWS = [{"qid": f"q{i}", "question": f"What is {i}?", "answer": str(i)} for i in range(5)]


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    import datasets

    root = tmp_path_factory.mktemp("tables")
    ds = datasets.Dataset.from_list(ROWS)
    paths = {"parquet": root / "in.parquet", "csv": root / "in.csv", "json": root / "in.json",
             "disk": root / "saved"}
    ds.to_parquet(str(paths["parquet"]))
    ds.to_csv(str(paths["csv"]), index=False)
    ds.to_json(str(paths["json"]))
    ds.save_to_disk(str(paths["disk"]))
    return paths


@pytest.mark.parametrize("fmt", ["parquet", "csv", "json", "disk"])
def test_every_format_with_field_mapping(tables, fmt):
    from seesaw_mcore.io import InputSpec, read_prompts

    spec = InputSpec(prompt_field="question", id_field="qid",
                     prompt_template="Q: {prompt}\nA:")
    records, errors = read_prompts(str(tables[fmt]), None, spec)
    assert errors == []
    assert [(r.id, r.prompt, r.line) for r in records] == [
        (f"q{i}", f"Q: What is {i}?\nA:", i + 1) for i in range(5)]


def test_missing_field_lists_the_available_ones(tables):
    from seesaw_mcore.io import InputSpec, read_prompts

    with pytest.raises(SeesawError) as e:
        read_prompts(str(tables["parquet"]), None, InputSpec())
    assert str(e.value) == (
        f"data.input {tables['parquet']} has no field 'prompt' (data.prompt_field) or "
        f"'messages' (data.messages_field); available fields: qid, question, answer")
    with pytest.raises(SeesawError, match=r"has no field 'key' \(data.id_field\); available "
                                          r"fields: qid, question, answer$"):
        read_prompts(str(tables["csv"]), None, InputSpec(prompt_field="question",
                                                          id_field="key"))


def test_template_needs_its_placeholder():
    from seesaw_mcore.io import InputSpec

    with pytest.raises(SeesawError, match=r"^data.prompt_template must contain \{prompt\}$"):
        InputSpec(prompt_template="Question:")


def test_system_prompt_prepended_to_chat_records(tmp_path):
    import os

    from transformers import AutoTokenizer

    from seesaw_mcore.io import InputSpec, read_prompts

    model = os.path.join(os.path.dirname(__file__), "..", "..", "models", "tiny-llama")
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    path = tmp_path / "chat.jsonl"
    user = [{"role": "user", "content": "Hi"}]
    path.write_text(json.dumps({"id": "c", "messages": user}) + "\n")
    [rec], _ = read_prompts(str(path), tok, InputSpec(system_prompt="Be brief."))
    want = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, *user],
                                   add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if hasattr(want, "keys") else want
    assert rec.prompt == {"prompt_token_ids": list(want)}


def test_messages_without_a_chat_template_are_a_record_error(tmp_path):
    """A tokenizer with no chat template: each chat record is reported, text records run."""
    import os

    from transformers import AutoTokenizer

    from seesaw_mcore.io import read_prompts

    model = os.path.join(os.path.dirname(__file__), "..", "..", "models", "tiny-llama")
    tok = AutoTokenizer.from_pretrained(model, local_files_only=True)
    tok.chat_template = None
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"id": "c", "messages": [{"role": "user", "content": "Hi"}]})
                    + "\n" + json.dumps({"id": "t", "prompt": "Hello"}) + "\n")
    records, errors = read_prompts(str(path), tok)
    assert [r.id for r in records] == ["t"]
    assert errors == [f"{path}:1: 'messages' given but the model's tokenizer has no chat "
                      "template"]
