"""JSONL in, JSONL out for ``launch/infer.py``.

Input records: ``{"id": ..., "prompt": "..."}`` or ``{"id": ..., "messages": [...]}`` (chat,
rendered with the tokenizer's chat template and ``add_generation_prompt``). A bad line is
reported with its file and line number; the valid lines still run.

Output is resumable: records are appended as requests finish; a rerun on the same output file
keeps its complete records, drops a torn last line (a killed run) and runs only the ids not
yet there.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from seesaw_mcore.engine.request import RequestOutput
from seesaw_mcore.errors import SeesawError


@dataclass(frozen=True)
class PromptRecord:
    """One valid input line."""

    id: str
    prompt: str | dict  # text, or {"prompt_token_ids": [...]} after a chat template
    line: int


def read_prompts(path: str, tokenizer) -> tuple[list[PromptRecord], list[str]]:
    """Reads a JSONL prompt file.

    Returns:
        ``(records, errors)``: valid records in file order, and one message per bad line.
    """
    if not os.path.isfile(path):
        raise SeesawError(f"data.input {path!r} does not exist")
    records, errors, seen = [], [], set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = _parse(line, n, tokenizer)
            except SeesawError as e:
                errors.append(f"{path}:{n}: {e}")
                continue
            if rec.id in seen:
                errors.append(f"{path}:{n}: duplicate id {rec.id!r}")
                continue
            seen.add(rec.id)
            records.append(rec)
    return records, errors


def _parse(line: str, n: int, tokenizer) -> PromptRecord:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise SeesawError(f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise SeesawError(f"expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", f"line-{n}")
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise SeesawError(f"'id' must be a string or integer, got {rid!r}")
    if "prompt" in obj:
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            raise SeesawError(f"'prompt' must be a string, got {type(prompt).__name__}")
        if not prompt:
            raise SeesawError("'prompt' is empty")
        return PromptRecord(str(rid), prompt, n)
    if "messages" in obj:
        return PromptRecord(str(rid), _chat(obj["messages"], tokenizer), n)
    raise SeesawError("record has neither 'prompt' nor 'messages'")


def _chat(messages, tokenizer) -> dict:
    ok = isinstance(messages, list) and messages and all(
        isinstance(m, dict) and isinstance(m.get("role"), str)
        and isinstance(m.get("content"), str) for m in messages)
    if not ok:
        raise SeesawError("'messages' must be a non-empty list of {role, content} strings")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise SeesawError("'messages' given but the model's tokenizer has no chat template")
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return {"prompt_token_ids": list(ids)}


class OutputWriter:
    """Appends one JSON line per finished request, flushed at once and fsynced at least every
    ``fsync_every_s`` seconds (and at ``close``).

    Args:
        path: the output file; its directory is created if missing.
        overwrite: start the file over; otherwise keep its complete records (``done``).
        fsync_every_s: how often written records are forced to disk.
    """

    def __init__(self, path: str, overwrite: bool = False, fsync_every_s: float = 5.0) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.fsync_every_s = path, fsync_every_s
        self.done: set[str] = set()  # ids already in the file
        self.dropped_bytes = 0  # a torn last line removed
        if not overwrite and os.path.exists(path):
            self.done, self.dropped_bytes = _recover(path)
        self._f = open(path, "w" if overwrite else "a", encoding="utf-8")
        self._synced = time.monotonic()

    def write(self, rec: PromptRecord, out: RequestOutput) -> None:
        first = out.outputs[0]
        row = {
            "id": rec.id,
            "prompt": rec.prompt if isinstance(rec.prompt, str) else None,
            "prompt_token_ids": out.prompt_token_ids,
            "text": first.text,
            "token_ids": first.token_ids,
            "finish_reason": first.finish_reason,
            "n": len(out.outputs),
            "outputs": [{"index": o.index, "text": o.text, "token_ids": o.token_ids,
                         "finish_reason": o.finish_reason} for o in out.outputs],
            "latency_s": round(out.latency_s, 4),
        }
        self._f.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._f.flush()
        if time.monotonic() - self._synced >= self.fsync_every_s:
            self._sync()

    def _sync(self) -> None:
        os.fsync(self._f.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        if not self._f.closed:
            self._f.flush()
            self._sync()
            self._f.close()


def _recover(path: str) -> tuple[set[str], int]:
    """Ids of the complete records of an earlier run's output; a torn last line (no newline,
    or not a record) is cut off.

    Returns:
        ``(ids, bytes dropped)``.

    Raises:
        SeesawError: for a bad record before the last line (not a crash's doing).
    """
    with open(path, "rb") as f:
        data = f.read()
    ids: set[str] = set()
    good = 0  # byte offset after the last complete record
    lines = data.split(b"\n")
    for n, raw in enumerate(lines, start=1):
        last = n == len(lines)  # no newline after it: written in part
        if last and not raw:
            break
        try:
            obj = None if last else json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            obj = None
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str):
            if n >= len(lines) - 1:  # the final line: torn by a killed run
                break
            raise SeesawError(f"data.output {path}:{n} is not a record of this tool; fix it or "
                              f"set data.overwrite=true")
        ids.add(obj["id"])
        good += len(raw) + 1
    dropped = len(data) - good
    if dropped:
        with open(path, "r+b") as f:
            f.truncate(good)
    return ids, dropped
