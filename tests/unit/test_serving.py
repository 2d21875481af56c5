"""The server's pieces without an engine: request validation (``serving/protocol.py``), the
response bodies (``serving/responses.py``), and the app's refusals over a stand-in engine
(a failed engine, a server stopping, the API key) through FastAPI's test client."""

from __future__ import annotations

import pytest

from seesaw_mcore.engine.load import RequestCounters
from seesaw_mcore.engine.request import CompletionOutput, Logprob, RequestOutput
from seesaw_mcore.serving.config import ServerConfig
from seesaw_mcore.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    RequestError,
    parse,
)
from seesaw_mcore.serving.responses import ResponseBuilder, generate_body

DECODE = {1: "a", 2: "b", 3: "c", 7: "x"}.get


@pytest.mark.parametrize("body, message, param", [
    (b"{", "malformed JSON: ", None),
    (b"  ", "the request body is empty: send a JSON object", None),
    (b"3", "the request body must be a JSON object", None),
    ({"prompt": 3}, "prompt: input should be a valid ", "prompt"),
    ({"prompt": "x", "n": 1.5}, "n: input should be a valid integer", "n"),
    ({"prompt": "x", "stream": "yes"}, "stream: input should be a valid boolean", "stream"),
    ({"prompt": "x", "min_p": 2}, "min_p must be a number in [0, 1], got 2", "min_p"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty must be a number in [-2, 2], "
     "got 3", "presence_penalty"),
    ({"prompt": "x", "stop": [""]}, "stop must be a list of non-empty strings, got ['']",
     "stop"),
    ({"prompt": [], "max_tokens": 2}, "prompt must not be empty", "prompt"),
    ({"prompt": [[1], []]}, "prompt must not hold an empty token list", "prompt"),
    ({"prompt": "x", "suffix": "y"}, "suffix is not supported", "suffix"),
])
def test_completion_requests_are_checked_field_by_field(body, message, param):
    with pytest.raises(RequestError) as e:
        req = parse(CompletionRequest, body)
        req.prompts()
        req.sampling()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert e.value.param == param and e.value.status == 400
    assert e.value.body()["error"]["type"] == "BadRequestError"


def test_completion_request_maps_to_sampling_params():
    req = parse(CompletionRequest, {"prompt": [[1, 2], [3]], "n": 2, "max_tokens": 5,
                                    "temperature": 0.5, "top_k": 4, "logprobs": 3,
                                    "echo": True, "seed": 9, "stop": "\n", "extra": 1})
    p = req.sampling()
    assert req.prompts() == [[1, 2], [3]] and req.ignored_fields() == ["extra"]
    assert (p.n, p.max_tokens, p.temperature, p.top_k, p.logprobs, p.prompt_logprobs,
            p.seed, p.stop) == (2, 5, 0.5, 4, 3, 3, 9, ["\n"])
    assert parse(CompletionRequest, {"prompt": "x"}).sampling().temperature == 1.0


def test_chat_and_generate_requests():
    chat = parse(ChatCompletionRequest, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 7, "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    assert chat.conversation() == [{"role": "user", "content": "a\nb"}]
    assert (chat.sampling().max_tokens, chat.sampling().logprobs) == (7, 2)
    gen = parse(GenerateRequest, {"input_ids": [[1, 2], [3]], "return_logprob": True,
                                  "sampling_params": {"max_new_tokens": 4, "min_new_tokens": 1,
                                                      "sampling_seed": 3}})
    ps = gen.sampling(2)
    assert gen.batched and gen.prompts() == [[1, 2], [3]]
    assert (ps[1].max_tokens, ps[1].min_tokens, ps[1].seed, ps[1].logprobs) == (4, 1, 3, 0)
    assert parse(GenerateRequest, {"text": "x"}).sampling(1)[0].max_tokens == 128
    with pytest.raises(RequestError, match="got 1 sampling_params for 2 prompts"):
        parse(GenerateRequest, {"text": ["a", "b"], "sampling_params": [{}]}).sampling(2)


def _out(finished: bool = True) -> RequestOutput:
    lp = [{2: Logprob(-0.5, 1, "b"), 3: Logprob(-1.5, 2, "c")},
          {7: Logprob(-2.0, 3, "x"), 1: Logprob(-0.1, 1, "a")}]
    return RequestOutput("r", "p", [1, 1], [None, {1: Logprob(-0.3, 1, "a")}],
                         [CompletionOutput(0, "bx", [2, 7], -2.5, lp,
                                           "length" if finished else None)],
                         finished=finished, num_cached_tokens=1)


def test_completion_bodies_logprobs_and_echo():
    b = ResponseBuilder("completion", "cmpl-1", "m", 1, DECODE, echo=True)
    body = b.response([_out()])
    c = body["choices"][0]
    assert c["text"] == "pbx" and c["finish_reason"] == "length"
    assert c["logprobs"] == {"tokens": ["a", "a", "b", "x"],
                             "token_logprobs": [None, -0.3, -0.5, -2.0],
                             "top_logprobs": [None, {"a": -0.3}, {"b": -0.5, "c": -1.5},
                                              {"x": -2.0, "a": -0.1}],
                             "text_offset": [0, 1, 2, 3]}
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4,
                             "prompt_tokens_details": {"cached_tokens": 1}}


def test_chat_stream_chunks_and_usage():
    b = ResponseBuilder("chat", "chatcmpl-1", "m", 1, DECODE, top_logprobs=1)
    first = b.chunk(0, _out(finished=False))
    assert first["object"] == "chat.completion.chunk"
    d = first["choices"][0]
    assert d["delta"] == {"role": "assistant", "content": "bx"} and d["finish_reason"] is None
    assert [t["top_logprobs"] for t in d["logprobs"]["content"]] == [
        [{"token": "b", "logprob": -0.5, "bytes": [98]}],
        [{"token": "a", "logprob": -0.1, "bytes": [97]}]]
    last = b.chunk(0, RequestOutput("r", "p", [1, 1], None, [CompletionOutput(
        0, "", [], None, [], "stop")], finished=True))
    assert last["choices"][0]["delta"] == {"content": ""}
    assert last["choices"][0]["finish_reason"] == "stop"
    assert b.usage_chunk()["usage"]["completion_tokens"] == 2


def test_generate_body():
    body = generate_body(_out(), _out().outputs[0], DECODE, with_text=True)
    assert body["output_ids"] == [2, 7] and body["text"] == "bx"
    meta = body["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 2}
    assert meta["output_token_logprobs"] == [[-0.5, 2, "b"], [-2.0, 7, "x"]]
    assert meta["input_token_logprobs"] == [[None, 1, None], [-0.3, 1, "a"]]


def test_generate_body_routed_experts_and_filtered_logprobs_are_json():
    """Routed experts as base64 int16 with their shape; a processed ``logprobs_mode``'s
    ``-inf`` (a token the filters drop) as ``-9999.0`` (Starlette refuses non-finite
    JSON)."""
    import base64
    import json

    import numpy as np

    out = _out()
    c = out.outputs[0]
    c.logprobs[1][7] = Logprob(float("-inf"), 2)
    c.routed_experts = np.arange(12, dtype=np.int16).reshape(3, 2, 2)
    body = json.loads(json.dumps(generate_body(out, c, DECODE, with_text=False),
                                 allow_nan=False))
    meta = body["meta_info"]
    assert meta["output_token_logprobs"][1] == [-9999.0, 7, None]
    enc = meta["routed_experts"]
    assert enc["shape"] == [3, 2, 2] and enc["dtype"] == "int16"
    assert np.array_equal(np.frombuffer(base64.b64decode(enc["data"]), "<i2").reshape(3, 2, 2),
                          c.routed_experts)
    b = ResponseBuilder("completions", "cmpl-1", "m", 1, DECODE)
    json.dumps(b.response([out]), allow_nan=False)


class _Engine:
    max_model_len = 64
    weights_version = 0

    class model_cfg:  # noqa: N801 - a stand-in
        vocab_size = 10


class _FakeLLM:
    """What the app reads of ``AsyncLLM`` before it queues anything."""

    tokenizer = None
    engine = _Engine()

    def __init__(self) -> None:
        self.errored, self.num_queued, self.counters = False, 0, RequestCounters()


def _client(llm, **cfg):
    from fastapi.testclient import TestClient

    from seesaw_mcore.serving.app import build_app

    app, server = build_app(llm, ServerConfig(**cfg), "m", "/models/m")
    return TestClient(app), server


def test_a_failed_engine_or_a_stopping_server_answers_503():
    llm = _FakeLLM()
    client, server = _client(llm)
    assert client.get("/health").status_code == 200
    llm.errored = True
    assert client.get("/health").status_code == 503
    r = client.post("/v1/completions", json={"prompt": [1]})
    assert r.status_code == 503
    assert r.json()["error"]["message"] == "the engine has failed; the server is stopping"
    assert "seesaw:prompt_tokens_total" in client.get("/metrics").text
    llm.errored, server.stopping = False, True
    r = client.post("/generate", json={"input_ids": [1]})
    assert (r.status_code, r.json()["error"]["message"]) == (503, "the server is shutting down")


def test_the_queue_limit_and_the_api_key():
    llm = _FakeLLM()
    client, _ = _client(llm, api_key="k", max_queued_requests=2)
    assert client.post("/v1/completions", json={"prompt": [1]}).status_code == 401
    assert client.get("/health").status_code == 200
    llm.num_queued = 2
    r = client.post("/v1/completions", json={"prompt": [1]},
                    headers={"Authorization": "Bearer k"})
    assert r.status_code == 503
    assert r.json()["error"]["message"] == ("the server's queue is full (2 requests "
                                            "waiting); retry later")


@pytest.mark.parametrize("field, value, message", [
    ("port", 70000, "server.port must be 0..65535, got 70000"),
    ("max_queued_requests", 0, "server.max_queued_requests must be >= 1, got 0"),
    ("log_level", "loud", "server.log_level must be one of critical, error, warning, info, "
                          "debug, trace, got 'loud'"),
    ("api_key", "", "server.api_key must not be empty (leave it unset for none)"),
])
def test_server_config_errors(field, value, message):
    from seesaw_mcore.errors import SeesawError

    with pytest.raises(SeesawError) as e:
        ServerConfig(**{field: value})
    assert str(e.value) == message
