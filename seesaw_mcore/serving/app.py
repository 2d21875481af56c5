"""The OpenAI-compatible HTTP front-end over ``AsyncLLM`` (FastAPI, served by uvicorn on
rank 0; ``launch/serve.py`` starts it).

Endpoints: ``/v1/completions``, ``/v1/chat/completions`` (streamed as server-sent events
with ``stream``), ``/v1/models``, ``/tokenize``, ``/detokenize``, ``/health``, ``/metrics``
(Prometheus), and the RL endpoints of ``serving/rl.py``. Every refusal is an OpenAI error
body with one line naming the field: 400 for a bad body, 401 for a wrong or missing API
key, 404 for another model's name, 503 when the queue is full, the server is stopping or
the engine has failed. A client that disconnects (streamed or not) aborts its requests.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from collections.abc import AsyncIterator, Callable, Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from seesaw_mcore.async_llm import AsyncLLM, EngineDeadError, RequestStream
from seesaw_mcore.engine.request import RequestOutput
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model.lora import LoRARequest
from seesaw_mcore.sampling_params import RequestOutputKind, SamplingParams
from seesaw_mcore.serving.config import ServerConfig
from seesaw_mcore.serving.lora import add_lora_routes
from seesaw_mcore.serving.metrics import metrics_text
from seesaw_mcore.serving.prepare import prepare, token_decoder
from seesaw_mcore.serving.protocol import (
    DetokenizeRequest,
    RequestError,
    TokenizeRequest,
    parse,
)
from seesaw_mcore.serving.responses import sse
from seesaw_mcore.serving.rl import add_rl_routes

OPEN_PATHS = ("/health", "/metrics", "/ping")  # answered without the API key
POLL_S = 0.5  # how often a non-streamed request checks that its client is still there


class Server:
    """The front-end's state: the engine, the settings, the names, whether it stops.

    Args:
        llm: the engine (rank 0's ``AsyncLLM``).
        config: the server's settings.
        model_name: the served model name.
        model_path: the model folder (``/v1/models``, ``/get_model_info``).
    """

    def __init__(self, llm: AsyncLLM, config: ServerConfig, model_name: str,
                 model_path: str) -> None:
        self.llm, self.config = llm, config
        self.model_name, self.model_path = model_name, model_path
        self.tokenizer = llm.tokenizer
        self.decode = token_decoder(self.tokenizer)
        self.stopping = False  # SIGTERM: new requests get 503
        self.groups: dict[str, list[str]] = {}  # a client's request id -> engine ids
        self.loras: dict[str, LoRARequest] = {}  # LoRA adapters by name (``model=``)
        self.lora_ids = itertools.count(1)  # each loaded adapter's lora_int_id
        self._warned: set[str] = set()

    def check_open(self) -> None:
        """Refuses a new request when the server cannot take it (503)."""
        if self.llm.errored:
            raise RequestError("the engine has failed; the server is stopping", status=503)
        if self.stopping:
            raise RequestError("the server is shutting down", status=503)
        queued = self.llm.num_queued
        if queued >= self.config.max_queued_requests:
            raise RequestError(f"the server's queue is full ({queued} requests waiting); "
                               "retry later", status=503)

    def warn_ignored(self, fields: list[str]) -> None:
        new = [f for f in fields if f not in self._warned]
        if new:
            self._warned.update(new)
            print(f"warning: ignored request fields this server does not know: "
                  f"{', '.join(new)}", file=sys.stderr, flush=True)

    def adapters_named(self, names: str | list[str | None] | None, n: int
                       ) -> list[LoRARequest | None]:
        """SGLang's ``lora_path``: a loaded adapter's name for every prompt, or a list."""
        if not isinstance(names, list):
            names = [names] * n
        if len(names) != n:
            raise RequestError(f"got {len(names)} lora_path entries for {n} prompts",
                               "lora_path")
        unknown = [x for x in names if x is not None and x not in self.loras]
        if unknown:
            raise RequestError(f"lora_path {unknown[0]!r} is not a loaded LoRA adapter "
                               "(load it with /load_lora_adapter)", "lora_path")
        return [None if x is None else self.loras[x] for x in names]

    async def start(self, prompts: list, params: list[SamplingParams], request_id: str,
                    ids: list[str] | None = None,
                    lora: LoRARequest | list[LoRARequest | None] | None = None
                    ) -> list[RequestStream]:
        """Queues every prompt (engine ids ``request_id`` or ``request_id-i``) under the
        adapter ``lora`` (one for all, or one per prompt; ``None``: the base model); a bad
        one aborts those queued before it and raises a ``RequestError``."""
        self.check_open()
        if ids is None:
            ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}"
                                                          for i in range(len(prompts))]
        streams: list[RequestStream] = []
        try:
            loras = lora if isinstance(lora, list) else [lora] * len(prompts)
            for prompt, p, rid, adapter in zip(prompts, params, ids, loras):
                streams.append(await self.llm.add_request(prompt, p, rid, adapter))
        except EngineDeadError as e:
            raise RequestError(str(e), status=503) from None
        except SeesawError as e:
            for s in streams:
                s.close()
            if isinstance(e, RequestError):
                raise
            raise RequestError(str(e), "prompt") from None
        self.groups[request_id] = ids
        return streams

    def done(self, request_id: str, streams: list[RequestStream]) -> None:
        for s in streams:
            s.close()
        self.groups.pop(request_id, None)

    async def finals(self, request: Request, request_id: str, streams: list[RequestStream]
                     ) -> list[RequestOutput]:
        """Every stream's final output; a client gone meanwhile aborts them all."""
        async def last(s: RequestStream) -> RequestOutput:
            return [out async for out in s][-1]  # (FINAL_ONLY: the one output)

        task = asyncio.ensure_future(asyncio.gather(*(last(s) for s in streams)))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=POLL_S)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    task.cancel()
                    raise ClientGone()
        except EngineDeadError as e:
            raise RequestError(str(e), status=503) from None
        finally:
            self.done(request_id, streams)

    async def merged(self, streams: list[RequestStream]
                     ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """``(prompt index, output)`` from every stream as they come."""
        if len(streams) == 1:
            async for out in streams[0]:
                yield 0, out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s: RequestStream) -> None:
            try:
                async for out in s:
                    await queue.put((i, out))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                await queue.put((i, e))
            await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            left = len(streams)
            while left:
                i, out = await queue.get()
                if out is None:
                    left -= 1
                elif isinstance(out, BaseException):
                    raise out
                else:
                    yield i, out
        finally:
            for t in tasks:
                t.cancel()


    def event_stream(self, request_id: str, streams: list[RequestStream],
                     bodies: Callable[[int, RequestOutput], Iterable[dict]],
                     tail: Callable[[], Iterable[dict]] = tuple) -> StreamingResponse:
        """A server-sent-events response: ``bodies(prompt index, output)`` for every output
        of every stream as it comes, then ``tail()``, then ``[DONE]``; an engine failure
        midway is one 503 error event. However it ends (a client gone included), the
        streams are closed: what has not finished is aborted."""
        async def events() -> AsyncIterator[str]:
            try:
                async for i, out in self.merged(streams):
                    for body in bodies(i, out):
                        yield sse(body)
                for body in tail():
                    yield sse(body)
            except SeesawError as e:  # the engine failed mid-stream
                yield sse(RequestError(str(e), status=503).body())
            finally:
                self.done(request_id, streams)
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")


class ClientGone(Exception):  # noqa: N818 - an event, not a failure
    """The client disconnected before its response was ready."""


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def build_app(llm: AsyncLLM, config: ServerConfig, model_name: str, model_path: str
              ) -> tuple[FastAPI, Server]:
    """The FastAPI app over ``llm`` and its ``Server`` state."""
    app = FastAPI(title="seesaw_mcore", docs_url=None, redoc_url=None)
    server = Server(llm, config, model_name, model_path)

    if config.api_key is not None:
        app.add_middleware(ApiKey, key=config.api_key)

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def bad_query(request: Request, e: RequestValidationError):
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"][1:])
        return error_response(RequestError(f"{field}: {err['msg']}", field or None))

    @app.exception_handler(ClientGone)
    async def gone(request: Request, e: ClientGone):
        return Response(status_code=499)

    async def openai(kind: str, request: Request):
        server.check_open()
        prep = prepare(kind, await request.body(), server.tokenizer, model_name,
                       request.headers.get("x-request-id"),  # vLLM's: the client names it
                       server.loras)
        server.warn_ignored(prep.ignored)
        params = prep.params
        params.output_kind = RequestOutputKind.DELTA if prep.stream \
            else RequestOutputKind.FINAL_ONLY
        rid = prep.builder.id
        streams = await server.start(prep.prompts, [params] * len(prep.prompts), rid,
                                     lora=server.loras.get(prep.request.model))
        if not prep.stream:
            outs = await server.finals(request, rid, streams)
            return JSONResponse(prep.builder.response(outs))

        def chunks(i: int, out: RequestOutput) -> list[dict]:
            chunk = prep.builder.chunk(i, out)
            return [] if chunk is None else [chunk]

        return server.event_stream(rid, streams, chunks, lambda: [
            prep.builder.usage_chunk()] if prep.include_usage else [])

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await openai("completion", request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await openai("chat", request)

    @app.get("/v1/models")
    async def models():
        card = {"object": "model", "created": 0, "owned_by": "seesaw_mcore",
                "max_model_len": llm.engine.max_model_len}
        return {"object": "list", "data": [
            {"id": model_name, "root": model_path, "parent": None, **card},
            *({"id": name, "root": r.lora_path, "parent": model_name, **card}
              for name, r in server.loras.items())]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = parse(TokenizeRequest, await request.body())
        tok = server.tokenizer
        if tok is None:
            raise RequestError("the model has no tokenizer")
        if (req.prompt is None) == (req.messages is None):
            raise RequestError("give exactly one of prompt and messages", "prompt")
        if req.prompt is not None:
            ids = tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        else:
            from seesaw_mcore.io.reader import render_chat

            try:
                ids = render_chat([m.flat() for m in req.messages], tok,
                                  add_generation_prompt=req.add_generation_prompt
                                  )["prompt_token_ids"]
            except SeesawError as e:
                raise RequestError(str(e), "messages") from None
        return {"count": len(ids), "max_model_len": llm.engine.max_model_len,
                "tokens": list(ids)}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = parse(DetokenizeRequest, await request.body())
        vocab = llm.engine.model_cfg.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"tokens: token id {bad[0]} is outside the vocabulary "
                               f"[0, {vocab})", "tokens")
        if server.tokenizer is None:
            raise RequestError("the model has no tokenizer")
        return {"prompt": server.tokenizer.decode(req.tokens)}

    @app.get("/health")
    async def health():
        if llm.errored or server.stopping:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        load = None if llm.errored else await llm.load()
        return Response(metrics_text(load, llm.counters, model_name),
                        media_type="text/plain; version=0.0.4; charset=utf-8")

    add_rl_routes(app, server)
    add_lora_routes(app, server)
    return app, server


class ApiKey:
    """ASGI middleware: HTTP requests but to ``OPEN_PATHS`` need ``Bearer <key>`` (401).
    (Plain ASGI, not ``BaseHTTPMiddleware``: a stream's client disconnect must reach it.)"""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization")
            if given != self.expected:
                e = RequestError("missing or wrong API key (Authorization: Bearer <key>)",
                                 status=401)
                await error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)
