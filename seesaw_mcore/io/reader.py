"""Prompts in, streamed: JSONL (line by line; a bad line is reported with its file and line
number and the valid lines still run), or JSON / Parquet / CSV / ``datasets.save_to_disk``
folders read with HF ``datasets``. Records are ``{"id": ..., "prompt": "..."}`` or
``{"id": ..., "messages": [...]}`` (chat, rendered with the tokenizer's chat template and
``add_generation_prompt``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass

from seesaw_mcore.errors import SeesawError


@dataclass(frozen=True)
class PromptRecord:
    """One valid input record."""

    id: str
    prompt: str | dict  # text, or {"prompt_token_ids": [...]} after a chat template
    line: int  # line (JSONL) or row number, from 1
    lora_path: str | None = None  # its own LoRA adapter folder (``InputSpec.lora_field``)


@dataclass(frozen=True)
class InputSpec:
    """How input records map to prompts (``data.*`` in the config).

    Attributes:
        prompt_field: the text prompt's field.
        messages_field: the chat messages' field (used when a record has no prompt).
        id_field: the id's field (default when absent: ``line-N`` / ``row-N``).
        system_prompt: prepended as a system message to chat records without one.
        prompt_template: applied to text prompts; must contain ``{prompt}``.
        lora_field: a record's own LoRA adapter folder's field.
    """

    prompt_field: str = "prompt"
    messages_field: str = "messages"
    id_field: str = "id"
    system_prompt: str | None = None
    prompt_template: str | None = None
    lora_field: str = "lora_path"

    def __post_init__(self) -> None:
        if self.prompt_template is not None and "{prompt}" not in self.prompt_template:
            raise SeesawError("data.prompt_template must contain {prompt}")


TABULAR = {".json": "json", ".parquet": "parquet", ".csv": "csv"}


class PromptReader:
    """Streams prompts from JSONL (line by line: a bad line is reported, the rest run),
    JSON, Parquet, CSV or a ``datasets.save_to_disk`` folder (through HF ``datasets``, local
    files only, streamed). The file and its fields are checked here; records are parsed
    (and chat templates applied) only as they are iterated, so the input never has to be
    in memory at once.

    Args:
        path: the input file or folder.
        tokenizer: for chat ``messages`` (may be ``None`` for text-only inputs).
        spec: the field mapping.
        skip: ids not to yield (already in a resumed output file).

    Attributes:
        errors: one message per bad record, appended as iteration reaches it.
        num_records / num_skipped: valid records seen, and of those the ``skip``-ped ones.

    Raises:
        SeesawError: for a missing or unreadable input, or fields the spec names that a
            table lacks.
    """

    def __init__(self, path: str, tokenizer, spec: InputSpec | None = None,
                 skip: set[str] | frozenset[str] = frozenset()) -> None:
        self.path, self.tokenizer, self.spec = path, tokenizer, spec or InputSpec()
        self.skip = skip
        self.errors: list[str] = []
        self.num_records = self.num_skipped = 0
        if not os.path.exists(path):
            raise SeesawError(f"data.input {path!r} does not exist")
        ext = os.path.splitext(path)[1].lower()
        if os.path.isdir(path) or ext in TABULAR:
            self._rows, self._unit = _dataset_rows(path, TABULAR.get(ext)), "row"
            _, fields = next(self._rows)
            _check_fields(path, fields, self.spec)
        else:
            if not os.access(path, os.R_OK):
                raise SeesawError(f"data.input {path!r} is not a readable file")
            self._rows, self._unit = _jsonl_rows(path), "line"

    def __iter__(self) -> Iterator[PromptRecord]:
        seen: set[str] = set()  # ids so far: a repeated id is a bad record
        for n, obj in self._rows:
            try:
                rid = _record_id(obj, n, self._unit, self.spec)
                if rid in seen:
                    raise SeesawError(f"duplicate id {rid!r}")
                # a done id is skipped before its prompt is templated or tokenized
                prompt = None if rid in self.skip else _prompt(obj, self.tokenizer, self.spec)
            except SeesawError as e:
                self.errors.append(f"{self.path}:{n}: {e}")
                continue
            seen.add(rid)
            self.num_records += 1
            if prompt is None:
                self.num_skipped += 1
                continue
            lora = obj.get(self.spec.lora_field) if isinstance(obj, dict) else None
            if lora is not None and not isinstance(lora, str):
                self.errors.append(f"{self.path}:{n}: {self.spec.lora_field} must be a string")
                continue
            yield PromptRecord(rid, prompt, n, lora or None)


def read_prompts(path: str, tokenizer, spec: InputSpec | None = None
                 ) -> tuple[list[PromptRecord], list[str]]:
    """All of ``PromptReader(path, tokenizer, spec)`` at once.

    Returns:
        ``(records, errors)``: valid records in file order, and one message per bad record.
    """
    reader = PromptReader(path, tokenizer, spec)
    records = list(reader)
    return records, reader.errors


def _check_fields(path: str, fields: list[str], spec: InputSpec) -> None:
    """A table must have the prompt or the messages field, and a configured id field."""
    available = ", ".join(fields) or "none"
    if spec.prompt_field not in fields and spec.messages_field not in fields:
        raise SeesawError(f"data.input {path} has no field {spec.prompt_field!r} (data."
                          f"prompt_field) or {spec.messages_field!r} (data.messages_field); "
                          f"available fields: {available}")
    if spec.id_field != "id" and spec.id_field not in fields:
        raise SeesawError(f"data.input {path} has no field {spec.id_field!r} (data.id_field); "
                          f"available fields: {available}")


MAX_RECORD_BYTES = 64 * 2**20  # a longer JSONL line is reported, not read into memory


def _jsonl_rows(path: str):
    """``(line number, object or SeesawError)`` per non-blank line: invalid UTF-8, invalid
    JSON and over-long lines are errors of their line."""
    with open(path, "rb") as f:
        n = 0
        while True:
            raw = f.readline(MAX_RECORD_BYTES + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_RECORD_BYTES and not raw.endswith(b"\n"):
                size = len(raw) + _skip_line(f)
                yield n, SeesawError(
                    f"record is {size} bytes; the limit is {MAX_RECORD_BYTES} "
                    "(seesaw_mcore.io.reader.MAX_RECORD_BYTES)")
                continue
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, SeesawError(f"invalid UTF-8 (byte {raw[e.start]:#04x} at byte "
                                     f"{e.start + 1} of the line)")
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                yield n, SeesawError(f"invalid JSON ({e.msg} at column {e.colno})")
            except RecursionError:
                yield n, SeesawError("invalid JSON (nested too deeply)")


def _skip_line(f) -> int:
    """Reads past the rest of the current line; returns its byte count."""
    skipped = 0
    while True:
        chunk = f.readline(2**20)
        skipped += len(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return skipped


def _dataset_rows(path: str, builder: str | None):
    """``(row number, dict)`` of a local file or ``save_to_disk`` folder, streamed."""
    import datasets

    try:
        if builder is None:
            ds = datasets.load_from_disk(path)
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[next(iter(ds))]
        else:
            ds = datasets.load_dataset(builder, data_files=path, split="train", streaming=True)
        rows = iter(ds)
        first = next(rows, None)  # a streamed CSV knows its columns only from its rows
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise SeesawError(f"cannot read data.input {path}: {type(e).__name__}: {e}") from None
    yield 0, list(ds.column_names or (first or {}))  # the field list first, for errors
    if first is not None:
        yield 1, first
        for n, row in enumerate(rows, start=2):
            yield n, row


def _record_id(obj, n: int, unit: str, spec: InputSpec) -> str:
    """The record's id (``line-N`` / ``row-N`` when it has none), if it is a record."""
    if isinstance(obj, SeesawError):
        raise obj
    if not isinstance(obj, dict):
        raise SeesawError(f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get(spec.id_field)
    if rid is None:
        rid = f"{unit}-{n}"
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise SeesawError(f"{spec.id_field!r} must be a string or integer, got {rid!r}")
    return str(rid)


def _prompt(obj: dict, tokenizer, spec: InputSpec) -> str | dict:
    """The record's text prompt (templated), or its chat rendered to token ids."""
    prompt = obj.get(spec.prompt_field)
    if prompt is not None:
        if not isinstance(prompt, str):
            raise SeesawError(
                f"{spec.prompt_field!r} must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise SeesawError(f"{spec.prompt_field!r} is empty")
        if spec.prompt_template is not None:
            prompt = spec.prompt_template.replace("{prompt}", prompt)
        return prompt
    messages = obj.get(spec.messages_field)
    if messages is not None:
        if spec.system_prompt and isinstance(messages, list) and not (
                messages and isinstance(messages[0], dict)
                and messages[0].get("role") == "system"):
            messages = [{"role": "system", "content": spec.system_prompt}, *messages]
        return {"prompt_token_ids": render_chat(messages, tokenizer)["prompt_token_ids"]}
    raise SeesawError(f"record has neither {spec.prompt_field!r} nor {spec.messages_field!r} "
                      f"(its fields: {', '.join(map(str, obj)) or 'none'})")


def render_chat(messages, tokenizer, chat_template: str | None = None,
                add_generation_prompt: bool = True) -> dict:
    """A conversation rendered with the tokenizer's chat template (or ``chat_template``):
    ``{"prompt_token_ids": [...], "prompt": text}``.

    Raises:
        SeesawError: malformed messages, no template, or the template rejecting them.
    """
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise SeesawError("'messages' must be a non-empty list of {role, content} strings")
    if tokenizer is None or not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise SeesawError("'messages' given but the model's tokenizer has no chat template")
    kw = {"chat_template": chat_template} if chat_template else {}
    try:
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kw)
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=True, **kw)
    except Exception as e:  # noqa: BLE001 - a template may reject any conversation
        raise SeesawError(f"the chat template rejected 'messages': {type(e).__name__}: "
                          f"{str(e)[:200]}") from None
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return {"prompt_token_ids": list(ids), "prompt": text}
