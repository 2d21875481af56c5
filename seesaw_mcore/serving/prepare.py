"""An OpenAI request body made ready for the engine: validated (``protocol``), its prompts
tokenized or rendered with the chat template, its ``SamplingParams`` and the builder of its
response bodies. The HTTP server and the offline OpenAI batch files share it, so both
accept and refuse the same bodies with the same messages."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Collection
from dataclasses import dataclass

from seesaw_mcore.errors import SeesawError
from seesaw_mcore.io.reader import render_chat
from seesaw_mcore.sampling_params import SamplingParams
from seesaw_mcore.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    RequestError,
    parse,
)
from seesaw_mcore.serving.responses import ResponseBuilder

ENDPOINTS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


@dataclass
class Prepared:
    """What the engine runs for one OpenAI request, and how its answer is written.

    Attributes:
        request: the validated body.
        prompts: engine prompts (``{"prompt_token_ids", "prompt"}``), one per prompt.
        params: the sampling parameters every prompt shares.
        builder: makes the response body (or streamed chunks) from the outputs.
        ignored: body fields this server does not know (vLLM warns and ignores them).
    """

    request: CompletionRequest | ChatCompletionRequest
    prompts: list[dict]
    params: SamplingParams
    builder: ResponseBuilder
    ignored: list[str]

    @property
    def stream(self) -> bool:
        return self.request.stream

    @property
    def include_usage(self) -> bool:
        opts = self.request.stream_options
        return opts is not None and opts.include_usage


def prepare(kind: str, body: bytes | dict, tokenizer, model_name: str,
            client_id: str | None = None, adapters: Collection[str] = ()) -> Prepared:
    """Validates and prepares a ``completion`` or ``chat`` request body; its response id is
    ``cmpl-`` / ``chatcmpl-`` and ``client_id`` (a client's ``X-Request-Id``) or a fresh one.
    ``model`` may name a loaded LoRA adapter (``adapters``): the response names it too.

    Raises:
        RequestError: a bad body (400, naming the field) or another model's name (404).
    """
    model = CompletionRequest if kind == "completion" else ChatCompletionRequest
    req = parse(model, body)
    if req.model is not None and req.model != model_name and req.model not in adapters:
        loaded = "".join(f", `{a}`" for a in adapters)
        raise RequestError(f"The model `{req.model}` does not exist (this server serves "
                           f"`{model_name}`{loaded})", "model", status=404)
    if req.model in adapters:
        model_name = req.model
    params = req.sampling()
    decode = token_decoder(tokenizer)
    suffix = client_id or uuid.uuid4().hex
    if kind == "completion":
        prompts = [_completion_prompt(p, tokenizer, req.add_special_tokens)
                   for p in req.prompts()]
        builder = ResponseBuilder("completion", f"cmpl-{suffix}",
                                  model_name, params.n, decode, echo=req.echo)
    else:
        try:
            prompts = [render_chat(req.conversation(), tokenizer, req.chat_template,
                                   req.add_generation_prompt)]
        except SeesawError as e:
            raise RequestError(str(e), "messages") from None
        builder = ResponseBuilder("chat", f"chatcmpl-{suffix}",
                                  model_name, params.n, decode,
                                  top_logprobs=params.logprobs)
    return Prepared(req, prompts, params, builder, req.ignored_fields())


def _completion_prompt(p: str | list[int], tokenizer, add_special_tokens: bool) -> dict:
    if isinstance(p, list):
        return {"prompt_token_ids": p}
    if tokenizer is None:
        raise RequestError("text prompts need the model's tokenizer: send token ids",
                           "prompt")
    return {"prompt_token_ids": tokenizer.encode(p, add_special_tokens=add_special_tokens),
            "prompt": p}


def token_decoder(tokenizer):
    """A cached ``token id -> text`` (``"token_id:N"`` without a tokenizer)."""
    if tokenizer is None:
        return lambda t: f"token_id:{t}"
    return functools.lru_cache(maxsize=65536)(lambda t: tokenizer.decode([t]))
