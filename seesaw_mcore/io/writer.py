"""Completions out, resumable: records are appended and flushed as requests finish; a rerun
on the same output file keeps its complete records, drops a torn last line (a killed run) and
runs only the ids not yet there.
"""

from __future__ import annotations

import json
import os
import threading
import time

from seesaw_mcore.engine.request import RequestOutput
from seesaw_mcore.errors import SeesawError


class OutputWriter:
    """Appends one JSON line per finished request, flushed at once and fsynced at least every
    ``fsync_every_s`` seconds (and at ``close``).

    Args:
        path: the output file, in an existing writable directory.
        overwrite: start the file over; otherwise keep its complete records (``done``).
        fsync_every_s: how often written records are forced to disk.
        key: the field that names a record (``id``; OpenAI batch output: ``custom_id``).
    """

    def __init__(self, path: str, overwrite: bool = False, fsync_every_s: float = 5.0,
                 key: str = "id") -> None:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise SeesawError(f"data.output {path!r}: directory {folder!r} does not exist")
        if not os.access(folder, os.W_OK) or (os.path.exists(path)
                                              and not os.access(path, os.W_OK)):
            raise SeesawError(f"data.output {path!r} is not writable")
        self.path, self.fsync_every_s = path, fsync_every_s
        self.done: set[str] = set()  # ids already in the file
        self.dropped_bytes = 0  # a torn last line removed
        if not overwrite and os.path.exists(path):
            self.done, self.dropped_bytes = _recover(path, key)
        self._f = open(path, "w" if overwrite else "a", encoding="utf-8")
        self._synced = time.monotonic()
        self.written = 0  # records appended by this run
        self._lock = threading.Lock()  # the watchdog thread may close it on a failure

    def write(self, out: RequestOutput) -> None:
        """Appends ``out`` as one line (its id and text prompt, every sample)."""
        first = out.outputs[0]
        row = {
            "id": out.request_id,
            "prompt": out.prompt,
            "prompt_token_ids": out.prompt_token_ids,
            "num_prompt_tokens": len(out.prompt_token_ids),
            "text": first.text,
            "token_ids": first.token_ids,
            "finish_reason": first.finish_reason,
            "stop_reason": first.stop_reason,
            "n": len(out.outputs),
            "outputs": [{"index": o.index, "text": o.text, "token_ids": o.token_ids,
                         "num_tokens": len(o.token_ids), "finish_reason": o.finish_reason,
                         "stop_reason": o.stop_reason,
                         **({"cumulative_logprob": o.cumulative_logprob,
                             "logprobs": logprobs_json(o.logprobs)}
                            if o.logprobs is not None else {}),
                         **({"routed_experts": routed_experts_json(o.routed_experts)}
                            if o.routed_experts is not None else {})}
                        for o in out.outputs],
            "latency_s": round(out.latency_s, 4),
        }
        if out.prompt_logprobs is not None:
            row["prompt_logprobs"] = logprobs_json(out.prompt_logprobs)
        self.write_row(row)

    def write_row(self, row: dict) -> None:
        """Appends ``row`` (a JSON object with the record's key) as one line."""
        line = json.dumps(row, ensure_ascii=False) + "\n"
        with self._lock:
            if self._f.closed:
                return
            self._f.write(line)
            self._f.flush()
            self.written += 1
            if time.monotonic() - self._synced >= self.fsync_every_s:
                self._sync()

    def _sync(self) -> None:
        os.fsync(self._f.fileno())
        self._synced = time.monotonic()

    def close(self) -> None:
        """Flushes, fsyncs and closes (idempotent, thread-safe)."""
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                self._sync()
                self._f.close()


def _recover(path: str, key: str = "id") -> tuple[set[str], int]:
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
        if not isinstance(obj, dict) or not isinstance(obj.get(key), str):
            if n >= len(lines) - 1:  # the final line: torn by a killed run
                break
            raise SeesawError(f"data.output {path}:{n} is not a record of this tool; fix it or "
                              f"set data.overwrite=true")
        ids.add(obj[key])
        good += len(raw) + 1
    dropped = len(data) - good
    if dropped:
        with open(path, "r+b") as f:
            f.truncate(good)
    return ids, dropped


def logprobs_json(entries: list | None) -> list | None:
    """Per position ``{token id (str): {"logprob", "rank", "decoded_token"}}`` (``None`` for a
    prompt's first position): vLLM's ``Logprob`` objects as JSON (a token a processed
    ``logprobs_mode`` filtered out, ``-inf``, as ``-9999.0``, vLLM's server value)."""
    if entries is None:
        return None
    return [None if e is None else {str(t): {"logprob": json_logprob(lp.logprob),
                                             "rank": lp.rank,
                                             "decoded_token": lp.decoded_token}
                                    for t, lp in e.items()} for e in entries]


def json_logprob(value: float) -> float:
    """A logprob (or logit) JSON can hold: ``-inf`` (a token the sampling filters drop) as
    ``-9999.0``, as vLLM's server writes it."""
    return value if value > -9999.0 else -9999.0


def routed_experts_json(rows) -> dict:
    """A completion's routed experts (``[tokens, MoE layers, top_k]`` int16) compactly:
    ``{"shape", "dtype": "int16", "data"}``, ``data`` the little-endian bytes in base64
    (``np.frombuffer(base64.b64decode(data), "<i2").reshape(shape)`` reads it back)."""
    import base64

    import numpy as np

    arr = np.ascontiguousarray(rows, dtype="<i2")
    return {"shape": list(arr.shape), "dtype": "int16",
            "data": base64.b64encode(arr.tobytes()).decode("ascii")}
