"""OpenAI Batch API files offline (``launch/infer.py data.format=openai_batch``).

Each input line is ``{"custom_id", "method": "POST", "url": "/v1/completions" |
"/v1/chat/completions", "body": {...}}``; each output line is OpenAI's
``{"id", "custom_id", "response": {"status_code": 200, "request_id", "body"}, "error":
null}``, written as its request finishes, resumable by ``custom_id`` like the other
formats. Bodies are validated and answered by the server's own code (``serving.prepare``),
so a file and the server accept and refuse the same requests; a refused line is reported
(file, line, the server's one-line message) and not written, so a corrected file's rerun
runs it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

from seesaw_mcore.engine.request import RequestOutput
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.io.reader import _jsonl_rows
from seesaw_mcore.sampling_params import SamplingParams
from seesaw_mcore.serving.prepare import ENDPOINTS, Prepared, prepare
from seesaw_mcore.serving.protocol import RequestError


@dataclass
class _Line:
    """One input line in flight: its prepared request and the outputs so far."""

    custom_id: str
    prepared: Prepared
    outputs: dict[int, RequestOutput] = field(default_factory=dict)


class OpenAIBatch:
    """The engine requests of a batch file and its output lines.

    Args:
        path: the batch input (JSONL).
        tokenizer: the model's (text prompts, chat templates).
        model_name: the name a body's ``model`` must carry (the model folder's name).
        skip: ``custom_id``s already in a resumed output (not run again).

    Attributes:
        errors: one message per refused line (``path:line: message``).
        num_records / num_skipped: valid lines seen, and of those the skipped ones.
    """

    def __init__(self, path: str, tokenizer, model_name: str,
                 skip: set[str] | frozenset[str] = frozenset()) -> None:
        if not os.path.isfile(path) or not os.access(path, os.R_OK):
            raise SeesawError(f"data.input {path!r} is not a readable file")
        self.path, self.tokenizer, self.model_name, self.skip = path, tokenizer, \
            model_name, skip
        self.errors: list[str] = []
        self.num_records = self.num_skipped = 0
        self._lines: dict[str, _Line] = {}  # by custom_id, until every prompt is done

    def requests(self) -> Iterator[tuple[str, dict, SamplingParams]]:
        """``(engine request id, prompt, params)`` for every prompt of every valid line,
        lazily (ids: ``custom_id`` for one prompt, ``custom_id#i`` for several)."""
        seen: set[str] = set()
        for n, obj in _jsonl_rows(self.path):
            try:
                if isinstance(obj, SeesawError):
                    raise obj
                cid, kind, body = self._check(obj, seen)
                seen.add(cid)
                self.num_records += 1
                if cid in self.skip:
                    self.num_skipped += 1
                    continue
                prep = prepare(kind, body, self.tokenizer, self.model_name)
            except SeesawError as e:
                self.errors.append(f"{self.path}:{n}: {e}")
                continue
            self._lines[cid] = _Line(cid, prep)
            many = len(prep.prompts) > 1
            for i, prompt in enumerate(prep.prompts):
                yield (f"{cid}#{i}" if many else cid), prompt, prep.params

    def finished(self, out: RequestOutput) -> dict | None:
        """Takes a finished request; returns its line's output record once every prompt
        of the line is done (else ``None``)."""
        cid, _, index = out.request_id.rpartition("#")
        if cid not in self._lines or not index.isdigit():
            cid, index = out.request_id, "0"
        line = self._lines[cid]
        line.outputs[int(index)] = out
        if len(line.outputs) < len(line.prepared.prompts):
            return None
        del self._lines[cid]
        outs = [line.outputs[i] for i in range(len(line.outputs))]
        body = line.prepared.builder.response(outs)
        return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": cid,
                "response": {"status_code": 200, "request_id": body["id"], "body": body},
                "error": None}

    @staticmethod
    def _check(obj, seen: set[str]) -> tuple[str, str, dict]:
        if not isinstance(obj, dict):
            raise RequestError("a batch line must be a JSON object")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise RequestError("custom_id must be a non-empty string")
        if cid in seen:
            raise RequestError(f"duplicate custom_id {cid!r}")
        if obj.get("method", "POST") != "POST":
            raise RequestError(f"method must be POST, got {obj.get('method')!r}")
        url = obj.get("url")
        if url not in ENDPOINTS:
            raise RequestError(f"url must be one of {', '.join(ENDPOINTS)}, got {url!r}")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise RequestError("body must be a JSON object")
        return cid, ENDPOINTS[url], body
