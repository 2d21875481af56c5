"""The requests the server takes, as pydantic models with vLLM's and SGLang's field names, and
their translation to this engine's ``SamplingParams``.

One validation for the HTTP server and the offline OpenAI batch files: a body that does not
fit its model, or whose values ``SamplingParams`` rejects, raises ``RequestError`` naming
the field (HTTP 400 with an OpenAI error body). Fields a model does not know are accepted
and reported (``ignored_fields``), as vLLM does, so clients that send extras keep working.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from seesaw_mcore.errors import SeesawError
from seesaw_mcore.sampling_params import SamplingParams

MAX_LOGPROBS = 20  # OpenAI's (and vLLM's default) most top logprobs per position


class RequestError(SeesawError):
    """A request the server refuses (HTTP ``status``, OpenAI error body naming ``param``)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param, self.status = param, status

    @property
    def kind(self) -> str:
        """OpenAI's error type for the status."""
        return {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
                429: "RateLimitError", 503: "ServiceUnavailableError"}.get(
                    self.status, "InternalServerError")

    def body(self) -> dict:
        """The OpenAI error body (``{"error": {...}}``, vLLM's fields)."""
        return {"object": "error", "error": {"message": str(self), "type": self.kind,
                                             "param": self.param, "code": self.status}}


class _Body(BaseModel):
    """A request body: strict JSON types, unknown fields kept aside (``ignored_fields``)."""

    model_config = ConfigDict(extra="allow", strict=True)

    def ignored_fields(self) -> list[str]:
        return sorted(self.model_extra or {})


class StreamOptions(_Body):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Body):
    """The sampling fields the OpenAI endpoints share (vLLM's extensions included)."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted, unused (OpenAI's)

    def _params(self, max_tokens: int | None, logprobs: int | None,
                prompt_logprobs: int | None) -> SamplingParams:
        fields = dict(n=self.n, max_tokens=max_tokens, logprobs=logprobs,
                      prompt_logprobs=prompt_logprobs, seed=self.seed, stop=self.stop,
                      stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos,
                      min_tokens=self.min_tokens, skip_special_tokens=self.skip_special_tokens,
                      spaces_between_special_tokens=self.spaces_between_special_tokens,
                      include_stop_str_in_output=self.include_stop_str_in_output)
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return sampling_params(fields)


class CompletionRequest(_Sampling):
    """``POST /v1/completions``: a prompt (text, token ids, or a list of either)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    add_special_tokens: bool = True
    prompt_logprobs: int | None = None  # vLLM's extension
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """Every prompt: a string or a token id list."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt must not be empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        if any(isinstance(x, list) and not x for x in p):
            raise RequestError("prompt must not hold an empty token list", "prompt")
        return list(p)

    def sampling(self) -> SamplingParams:
        _check_logprobs("logprobs", self.logprobs)
        if self.suffix:
            raise RequestError("suffix is not supported", "suffix")
        prompt_lp = self.prompt_logprobs
        if self.echo and self.logprobs is not None:
            prompt_lp = max(prompt_lp or 0, self.logprobs)
        return self._params(self.max_tokens, self.logprobs, prompt_lp)


class ChatMessage(_Body):
    role: str
    content: str | list[dict] | None = None

    def flat(self) -> dict:
        """``{"role", "content"}`` with text parts joined (images are refused)."""
        content = self.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestError("messages: only text content parts are supported",
                                       "messages")
                texts.append(part["text"])
            content = "\n".join(texts)
        return {"role": self.role, "content": content or ""}


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``: messages rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    chat_template: str | None = None
    echo: bool = False  # vLLM's: the reply starts with the last message's content

    def sampling(self) -> SamplingParams:
        _check_logprobs("top_logprobs", self.top_logprobs)
        if self.top_logprobs and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs=true", "top_logprobs")
        top = (self.top_logprobs or 0) if self.logprobs else None
        limit = self.max_completion_tokens if self.max_completion_tokens is not None \
            else self.max_tokens
        return self._params(limit, top, None)

    def conversation(self) -> list[dict]:
        return [m.flat() for m in self.messages]


class GenerateRequest(_Body):
    """``POST /generate`` (SGLang's token-in/token-out request)."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    rid: str | list[str] | None = None
    lora_path: str | list[str | None] | None = None  # SGLang: loaded adapters' names

    def prompts(self) -> list[str | list[int]]:
        if (self.text is None) == (self.input_ids is None):
            raise RequestError("give exactly one of text and input_ids", "input_ids")
        if self.text is not None:
            return [self.text] if isinstance(self.text, str) else list(self.text)
        ids = self.input_ids
        if not ids:
            raise RequestError("input_ids must not be empty", "input_ids")
        return [list(ids)] if isinstance(ids[0], int) else [list(x) for x in ids]

    @property
    def batched(self) -> bool:
        """A list of prompts (answered with a list), not one."""
        return isinstance(self.text, list) or (
            bool(self.input_ids) and isinstance(self.input_ids[0], list))

    def sampling(self, num_prompts: int) -> list[SamplingParams]:
        """One ``SamplingParams`` per prompt from SGLang's ``sampling_params`` names."""
        _check_logprobs("top_logprobs_num", self.top_logprobs_num)
        given = self.sampling_params or {}
        listed = given if isinstance(given, list) else [given] * num_prompts
        if len(listed) != num_prompts:
            raise RequestError(f"got {len(listed)} sampling_params for {num_prompts} prompts",
                               "sampling_params")
        return [self._one(p) for p in listed]

    def _one(self, p: dict) -> SamplingParams:
        known = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens",
                 "sampling_seed": "seed"}
        fields = {known.get(k, k): v for k, v in p.items()}
        fields.setdefault("max_tokens", 128)  # SGLang's default
        fields.pop("no_stop_trim", None)
        logprobs = self.top_logprobs_num if self.return_logprob else None
        fields["logprobs"] = logprobs
        if self.return_logprob and self.logprob_start_len >= 0:
            fields["prompt_logprobs"] = self.top_logprobs_num
            fields["prompt_logprobs_from"] = self.logprob_start_len
        return sampling_params(fields, prefix="sampling_params.")


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]


class AbortRequest(_Body):
    rid: str | list[str] | None = None
    abort_all: bool = False


class PauseRequest(_Body):
    mode: Literal["abort", "wait", "keep", "in_place", "retract"] = "abort"
    clear_cache: bool = False


class InitGroupRequest(_Body):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str | None = None


class DistributedUpdateRequest(_Body):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True


class DiskUpdateRequest(_Body):
    model_path: str
    load_format: str | None = None


class WakeUpRequest(_Body):
    tags: list[str] | None = None


class LoadLoRARequest(_Body):
    lora_name: str
    lora_path: str


class UnloadLoRARequest(_Body):
    lora_name: str
    lora_int_id: int | None = None


# SamplingParams fields a request may set by name (``GenerateRequest``'s sampling_params)
_PARAM_NAMES = set(SamplingParams.__dataclass_fields__) - {"output_kind"}


def sampling_params(fields: dict, prefix: str = "") -> SamplingParams:
    """``SamplingParams(**fields)``; its one-line error becomes a ``RequestError`` naming the
    field (``prefix`` + its name). Unknown names are a ``RequestError`` too."""
    unknown = sorted(set(fields) - _PARAM_NAMES)
    if unknown:
        raise RequestError(f"unknown sampling parameter {prefix}{unknown[0]}",
                           f"{prefix}{unknown[0]}")
    try:
        return SamplingParams(**fields)
    except SeesawError as e:
        m = re.match(r"SamplingParams\.(\w+) (.*)", str(e))
        if m is None:
            raise RequestError(str(e)) from None
        raise RequestError(f"{prefix}{m.group(1)} {m.group(2)}", prefix + m.group(1)) from None


def parse(model: type[_Body], raw: bytes | str | dict) -> _Body:
    """A body validated against ``model`` (a ``RequestError`` naming the first bad field)."""
    try:
        if isinstance(raw, dict):
            return model.model_validate_json(json.dumps(raw))
        if not raw or not raw.strip():
            raise RequestError("the request body is empty: send a JSON object")
        return model.model_validate_json(raw)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise RequestError(f"malformed JSON: {err['msg']}") from None
        if err["type"] == "model_type" or err["type"] == "model_attributes_type":
            raise RequestError("the request body must be a JSON object") from None
        loc = _field(err["loc"])
        raise RequestError(f"{loc}: {_short(err)}", loc or None) from None


def _field(loc: tuple) -> str:
    """Pydantic's error location as a field path (union branch names dropped)."""
    parts = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        elif not ("[" in p or p in ("str", "int", "float", "bool", "none")):
            parts.append(("." if parts else "") + p)
    return "".join(parts)


def _short(err: dict) -> str:
    msg = err["msg"]
    if err["type"] == "missing":
        return "field required"
    return msg[0].lower() + msg[1:] if msg else msg


def _check_logprobs(name: str, value: int | None) -> None:
    if value is not None and not 0 <= value <= MAX_LOGPROBS:
        raise RequestError(f"{name} must be between 0 and {MAX_LOGPROBS}, got {value}", name)
