"""Response bodies from the engine's ``RequestOutput``s, in OpenAI's shapes (vLLM's fields)
and SGLang's ``/generate`` shape, for whole responses and streamed chunks.

Choice indices follow vLLM: prompt ``i``'s sample ``k`` is choice ``i * n + k``. Logprobs
are the engine's ``Logprob`` values, so an ``echo`` + ``logprobs`` completion scores a
continuation exactly as the in-process lm-eval backend does.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from seesaw_mcore.engine.request import CompletionOutput, Logprob, RequestOutput
from seesaw_mcore.io.writer import json_logprob, routed_experts_json

Decode = Callable[[int], str]  # one token id -> its text


@dataclass
class Usage:
    """Token counts of one response (``usage``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def add_prompt(self, out: RequestOutput) -> None:
        self.prompt_tokens += len(out.prompt_token_ids)
        self.cached_tokens += out.num_cached_tokens

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


def _token_text(entry: dict[int, Logprob] | None, tid: int, decode: Decode) -> str:
    lp = entry.get(tid) if entry else None
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else decode(tid)


@dataclass
class TextLogprobs:
    """A completion choice's ``logprobs`` (OpenAI's legacy shape), grown chunk by chunk."""

    decode: Decode
    offset: int = 0  # text offset of the next token
    tokens: list[str] = field(default_factory=list)
    token_logprobs: list[float | None] = field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = field(default_factory=list)
    text_offset: list[int] = field(default_factory=list)

    def add(self, ids: list[int], entries: list[dict[int, Logprob] | None]) -> dict:
        """Appends tokens ``ids`` with their ``entries``; returns the body of what was added."""
        start = len(self.tokens)
        for tid, entry in zip(ids, entries):
            text = _token_text(entry, tid, self.decode)
            self.tokens.append(text)
            self.text_offset.append(self.offset)
            self.offset += len(text)
            if entry is None:
                self.token_logprobs.append(None)
                self.top_logprobs.append(None)
                continue
            self.token_logprobs.append(json_logprob(entry[tid].logprob))
            self.top_logprobs.append({_token_text(entry, t, self.decode):
                                      json_logprob(lp.logprob) for t, lp in entry.items()})
        return self.body(start)

    def body(self, start: int = 0) -> dict:
        return {"tokens": self.tokens[start:], "token_logprobs": self.token_logprobs[start:],
                "top_logprobs": self.top_logprobs[start:], "text_offset": self.text_offset[start:]}


def chat_logprobs(ids: list[int], entries: list[dict[int, Logprob]], top: int,
                  decode: Decode) -> dict:
    """A chat choice's ``logprobs`` (``{"content": [...]}``, top ``top`` alternatives)."""
    def item(tid: int, lp: Logprob, entry) -> dict:
        text = _token_text(entry, tid, decode)
        return {"token": text, "logprob": json_logprob(lp.logprob),
                "bytes": list(text.encode())}

    content = []
    for tid, entry in zip(ids, entries):
        alts = sorted(((t, lp) for t, lp in entry.items() if lp.rank is not None
                       and lp.rank <= top), key=lambda x: x[1].rank)
        content.append({**item(tid, entry[tid], entry),
                        "top_logprobs": [item(t, lp, entry) for t, lp in alts[:top]]})
    return {"content": content}


class ResponseBuilder:
    """Bodies for one OpenAI request over its prompts' outputs.

    Args:
        kind: ``"completion"`` or ``"chat"``.
        request_id: the response id (``cmpl-...`` / ``chatcmpl-...``).
        model: the served model name.
        n: samples per prompt.
        decode: a token id's text.
        echo: completions: the prompt's text (and logprobs) lead each choice.
        top_logprobs: chat: alternatives per position (``None``: no logprobs).
    """

    def __init__(self, kind: str, request_id: str, model: str, n: int, decode: Decode,
                 echo: bool = False, top_logprobs: int | None = None) -> None:
        self.kind, self.id, self.model, self.n = kind, request_id, model, n
        self.decode, self.echo, self.top = decode, echo, top_logprobs
        self.created = int(time.time())
        self.usage = Usage()
        self._logprobs: dict[int, TextLogprobs] = {}  # completions, by choice index
        self._started: set[int] = set()  # choices whose first chunk went out

    @property
    def object(self) -> str:
        return "text_completion" if self.kind == "completion" else "chat.completion"

    # -- whole responses ----------------------------------------------------------------

    def response(self, outputs: list[RequestOutput]) -> dict:
        """The non-streamed body over every prompt's final output (in prompt order)."""
        choices = []
        for i, out in enumerate(outputs):
            self.usage.add_prompt(out)
            for c in out.outputs:
                self.usage.completion_tokens += len(c.token_ids)
                choices.append(self._choice(i, out, c, first=True, final=True))
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "choices": choices, "usage": self.usage.body()}

    # -- streams ------------------------------------------------------------------------

    def chunk(self, prompt_index: int, delta: RequestOutput) -> dict | None:
        """A streamed chunk from prompt ``prompt_index``'s delta output (``None``: nothing
        new)."""
        choices = []
        if delta.finished:
            self.usage.add_prompt(delta)
        for c in delta.outputs:
            self.usage.completion_tokens += len(c.token_ids)
            index = prompt_index * self.n + c.index
            first = index not in self._started
            if not (c.token_ids or c.text or c.finish_reason or first):
                continue
            self._started.add(index)
            choice = self._choice(prompt_index, delta, c, first, c.finish_reason is not None)
            if self.kind == "chat":
                choice["delta"] = choice.pop("message")
            choices.append(choice)
        if not choices:
            return None
        return {"id": self.id, "object": self.object + ("" if self.kind == "completion"
                                                       else ".chunk"),
                "created": self.created, "model": self.model, "choices": choices}

    def usage_chunk(self) -> dict:
        """The last chunk of a stream with ``stream_options.include_usage``."""
        return {"id": self.id, "object": self.object + ("" if self.kind == "completion"
                                                       else ".chunk"),
                "created": self.created, "model": self.model, "choices": [],
                "usage": self.usage.body()}

    # -- one choice ---------------------------------------------------------------------

    def _choice(self, prompt_index: int, out: RequestOutput, c: CompletionOutput,
                first: bool, final: bool) -> dict:
        index = prompt_index * self.n + c.index
        finish = {"finish_reason": c.finish_reason if final else None,
                  "stop_reason": c.stop_reason if final else None}
        if self.kind == "chat":
            lp = (chat_logprobs(c.token_ids, c.logprobs, self.top, self.decode)
                  if self.top is not None and c.logprobs is not None else None)
            message = {"role": "assistant", "content": c.text} if first else {"content": c.text}
            return {"index": index, "message": message, "logprobs": lp, **finish}
        text = c.text
        logprobs = None
        if c.logprobs is not None:
            book = self._logprobs.setdefault(index, TextLogprobs(self.decode))
            ids, entries = list(c.token_ids), list(c.logprobs)
            if self.echo and first:
                ids = out.prompt_token_ids + ids
                entries = list(out.prompt_logprobs or [None] * len(out.prompt_token_ids)) \
                    + entries
            logprobs = book.add(ids, entries)
        if self.echo and first:
            text = self.prompt_text(out) + text
        return {"index": index, "text": text, "logprobs": logprobs, **finish}

    def prompt_text(self, out: RequestOutput) -> str:
        if out.prompt is not None:
            return out.prompt
        return "".join(self.decode(t) for t in out.prompt_token_ids)


def generate_body(out: RequestOutput, c: CompletionOutput, decode: Decode,
                  with_text: bool) -> dict:
    """SGLang's ``/generate`` body for one sample: ``text``, ``output_ids``, ``meta_info``
    (finish reason, token counts, per-token logprobs as ``[logprob, id, text|None]``)."""
    def triple(tid: int, lp: Logprob, entry) -> list:
        return [json_logprob(lp.logprob), tid,
                _token_text(entry, tid, decode) if with_text else None]

    if c.finish_reason == "length":
        reason = {"type": "length", "length": len(c.token_ids)}
    elif c.finish_reason == "stop":
        reason = {"type": "stop", "matched": c.stop_reason}
    else:
        reason = None if c.finish_reason is None else {"type": c.finish_reason}
    meta = {"id": out.request_id, "finish_reason": reason,
            "prompt_tokens": len(out.prompt_token_ids),
            "completion_tokens": len(c.token_ids), "cached_tokens": out.num_cached_tokens,
            "e2e_latency": out.latency_s}
    if c.logprobs is not None:
        meta["output_token_logprobs"] = [triple(t, e[t], e)
                                         for t, e in zip(c.token_ids, c.logprobs)]
        meta["output_top_logprobs"] = [
            [triple(t, lp, e) for t, lp in sorted(e.items(), key=lambda x: x[1].rank or 0)
             if lp.rank is not None] for e in c.logprobs]
    if out.prompt_logprobs is not None:
        meta["input_token_logprobs"] = [
            [None, t, None] if e is None or t not in e else triple(t, e[t], e)
            for t, e in zip(out.prompt_token_ids, out.prompt_logprobs)]
    if c.routed_experts is not None:
        meta["routed_experts"] = routed_experts_json(c.routed_experts)
    return {"text": c.text, "output_ids": list(c.token_ids), "meta_info": meta}


def sse(obj: dict | str) -> str:
    """One server-sent event (``data: <json>``)."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"
