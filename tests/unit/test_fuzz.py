"""Property-based fuzzing (hypothesis) of everything a user hands the engine: the JSONL
reader (random bytes, truncated lines, wrong types, huge and deeply nested fields, invalid
UTF-8), ``SamplingParams`` and plan strings. Every case is accepted or rejected with a
``SeesawError`` naming the record or field: never another exception, never a valid record
lost."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seesaw_mcore.config import ParallelConfig, PhasePlan
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.io import PromptReader
from seesaw_mcore.sampling_params import SamplingParams

FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=10)

valid_record = st.builds(lambda rid, text: {"id": rid, "prompt": text},
                         st.uuids().map(str), st.text(min_size=1, max_size=200))
bad_line = st.one_of(
    st.binary(max_size=80),  # random bytes (invalid UTF-8 among them)
    json_values.map(lambda v: json.dumps(v).encode()),  # any JSON, mostly not a record
    st.fixed_dictionaries({"id": json_values, "prompt": json_values}).map(
        lambda d: json.dumps(d).encode()),  # wrong types
    st.fixed_dictionaries({"id": st.text(max_size=5), "messages": json_values}).map(
        lambda d: json.dumps(d).encode()),  # malformed chat
    st.integers(1, 5000).map(lambda n: b"[" * n),  # nested too deeply / truncated
    st.just(b'{"id": "x", "prompt": "\\xff\\xfe'),  # truncated mid-string
    st.just(b'{"id": "y", "prompt": "caf\xe9"}'),  # latin-1, not UTF-8
)


def _is_valid(obj) -> bool:
    """The reader's own rules for a record (no chat: no tokenizer here)."""
    if not isinstance(obj, dict):
        return False
    rid, prompt = obj.get("id"), obj.get("prompt")
    id_ok = rid is None or (isinstance(rid, (str, int)) and not isinstance(rid, bool))
    return id_ok and isinstance(prompt, str) and bool(prompt)


@FUZZ
@given(st.lists(st.one_of(valid_record.map(lambda r: ("ok", r)),
                          bad_line.map(lambda b: ("bad", b))), max_size=25))
def test_reader_keeps_every_valid_record_and_names_every_bad_line(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("fuzz") / "in.jsonl"
    raw = [json.dumps(x, ensure_ascii=False).encode() if kind == "ok" else x.replace(b"\n", b" ")
           for kind, x in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    reader = PromptReader(str(path), None)
    records = list(reader)  # only SeesawError-free iteration is acceptable
    want, seen = [], set()
    for n, line in enumerate(raw, start=1):  # what the file really holds, line by line
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue
        if _is_valid(obj):
            rid = str(obj["id"]) if obj.get("id") is not None else f"line-{n}"
            if rid not in seen:
                seen.add(rid)
                want.append((rid, obj["prompt"], n))
    assert [(r.id, r.prompt, r.line) for r in records] == want
    reported = {int(e.split(":")[1]) for e in reader.errors}
    blank = {n for n, line in enumerate(raw, start=1) if not line.strip()}
    kept = {r.line for r in records}
    assert reported | kept | blank == set(range(1, len(raw) + 1))  # every line accounted for
    assert not reported & kept
    assert all(e.startswith(f"{path}:") for e in reader.errors)


@FUZZ
@given(st.binary(max_size=2000))
def test_reader_on_random_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "bytes.jsonl"
    path.write_bytes(data)
    reader = PromptReader(str(path), None)
    records = list(reader)
    assert len(records) + len(reader.errors) <= data.count(b"\n") + 1


def test_reader_huge_and_nested_lines(tmp_path, monkeypatch):
    import seesaw_mcore.io.reader as io

    monkeypatch.setattr(io, "MAX_RECORD_BYTES", 1000)
    path = tmp_path / "huge.jsonl"
    big = json.dumps({"id": "big", "prompt": "x" * 5000}).encode() + b"\n"
    path.write_bytes(big + b"[" * 100_000 + b"\n"
                     + json.dumps({"id": "ok", "prompt": "fine"}).encode() + b"\n")
    reader = PromptReader(str(path), None)
    assert [r.id for r in reader] == ["ok"]
    assert reader.errors == [
        f"{path}:1: record is {len(big)} bytes; the limit is 1000 "
        "(seesaw_mcore.io.reader.MAX_RECORD_BYTES)",
        f"{path}:2: record is 100001 bytes; the limit is 1000 "
        "(seesaw_mcore.io.reader.MAX_RECORD_BYTES)"]


values = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12),
                   st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=10),
                   st.lists(st.one_of(st.integers(-5, 10**6), st.text(max_size=5)), max_size=4))
FIELDS = ["n", "temperature", "top_k", "top_p", "seed", "max_tokens", "stop", "stop_token_ids",
          "ignore_eos", "logprobs"]


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), values, max_size=5))
def test_sampling_params_accept_or_name_the_field(kwargs):
    try:
        sp = SamplingParams(**kwargs)
    except SeesawError as e:
        assert str(e).startswith("SamplingParams.")
        assert str(e).split(".")[1].split(" ")[0] in kwargs  # names a field it was given
        return
    assert sp.n >= 1 and (sp.max_tokens is None or sp.max_tokens >= 1)
    assert sp.temperature >= 0 and 0 < sp.top_p <= 1


plan_text = st.one_of(st.text(max_size=12),
                      st.text(alphabet="DTP0123456789 x->", max_size=10))


@FUZZ
@given(plan_text, st.one_of(st.none(), plan_text))
def test_plan_strings_parse_or_explain(prefill, decode):
    try:
        plan = PhasePlan.parse(prefill, decode)
    except SeesawError as e:
        assert str(e)
        return
    assert plan.prefill.world_size == plan.decode.world_size >= 1
    assert str(ParallelConfig.parse(str(plan.prefill))) == str(plan.prefill)


CONFIG_KEYS = ["architectures", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "vocab_size", "rms_norm_eps",
               "max_position_embeddings", "head_dim", "rope_theta", "eos_token_id",
               "tie_word_embeddings", "torch_dtype"]


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values, min_size=1, max_size=3))
def test_config_json_that_lies_is_refused_before_loading(tmp_path_factory, changes):
    """The bundled model with fuzzed config.json fields: the config and the checkpoint are
    either consistent (opened) or refused with a ``SeesawError``."""
    import os
    import shutil

    from seesaw_mcore.config import ModelConfig
    from seesaw_mcore.model.loader import Checkpoint

    src = os.path.join(os.path.dirname(__file__), "..", "..", "models", "tiny-llama")
    dst = tmp_path_factory.mktemp("cfg") / "m"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    try:
        Checkpoint(ModelConfig.from_pretrained(str(dst)))
    except SeesawError as e:
        assert str(e)
