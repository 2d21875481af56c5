"""launch/serve.py over real HTTP on the loopback, with the real ``openai`` client, httpx and
lm-eval's ``local-completions``: a T1 server on one rank and a P2:T2 server on two (with an
API key and a 4-request queue), started once for the module.

Completions and chat (greedy and seeded) equal ``LLM.generate`` / ``LLM.chat``'s tokens and
logprobs; streams add up to the whole response; ``n``, ``echo`` + ``logprobs``; lm-eval's
``local-completions`` gives the in-process backend's results; ``/generate`` token in, token
out; 256 concurrent streaming clients; disconnects and ``/abort_request`` free every block;
pause, a weight update from a trainer process or from disk, continue; every bad input's
status and one-line message; a full queue; SIGTERM with a request in flight; a failed rank.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.conftest import REPO, TINY, launch, launch_cmd, launch_env

KEY = "sk-seesaw-test"
PROMPTS = ["Return the number of", "This module provides", "If the file does not exist,",
           "Create a new"]
CHATS = [[{"role": "user", "content": "Return the number of bytes."}],
         [{"role": "system", "content": "Be brief."},
          {"role": "user", "content": "What does this module provide?"}]]
GREEDY = {"temperature": 0, "max_tokens": 12, "logprobs": 2}
SEEDED = {"temperature": 0.8, "top_p": 0.9, "seed": 7, "max_tokens": 12, "logprobs": 2}


class Server:
    """A ``launch.serve`` job: started, its URL read from its ``serving ...`` line."""

    def __init__(self, nprocs: int, overrides: list[str], timeout: float = 240.0) -> None:
        cmd = launch_cmd(nprocs, ["launch.serve", "server.port=0", *overrides], "ds-launch")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.url: str | None = None
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"serving \S+ on (http://\S+) \(plan", line)
                if m:
                    self.url = m.group(1)
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.url is None:
            self.kill()
            raise AssertionError("server did not start:\n" + self.log[-3000:])

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def pid_of_rank(self, rank: int) -> int:
        import psutil

        for p in psutil.Process(self.proc.pid).children(recursive=True):
            if "launch.serve" in " ".join(p.cmdline()) and \
                    p.environ().get("RANK") == str(rank):
                return p.pid
        raise AssertionError(f"rank {rank} not found")

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def new_weights(tmp_path_factory) -> str:
    """The demo model with other weights (every tensor perturbed): what updates load."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("tiny_b") / "tiny-llama-b"
    shutil.copytree(TINY, root)
    g = torch.Generator().manual_seed(3)
    for f in root.glob("*.safetensors"):
        ts = load_file(f)
        save_file({k: (v + 0.05 * torch.randn(v.shape, generator=g).to(v.dtype)).contiguous()
                   for k, v in ts.items()}, f, metadata={"format": "pt"})
    return str(root)


@pytest.fixture(scope="module")
def servers():
    t1 = Server(1, ["plan=T1", "dtype=float32"])
    try:
        p2 = Server(2, ["plan=P2:T2", "dtype=float32", f"server.api_key={KEY}",
                        "server.max_queued_requests=4", "cache.host_kv_tokens=4096"])
    except BaseException:
        t1.kill()
        raise
    yield {"T1": t1, "P2:T2": p2}
    for s in (t1, p2):
        s.kill()


@pytest.fixture(scope="module")
def ref(tmp_path_factory, new_weights) -> dict:
    from tests.distributed.lm_eval_job import TASKS
    from tests.distributed.test_lm_eval import _task_dir

    root = tmp_path_factory.mktemp("server_ref")
    cases = [{"name": "greedy", "model": TINY, "prompts": PROMPTS, "params": GREEDY},
             {"name": "seeded", "model": TINY, "prompts": PROMPTS, "params": SEEDED},
             {"name": "chat", "model": TINY, "chats": CHATS, "params": GREEDY},
             {"name": "echo", "model": TINY, "prompts": PROMPTS[:2],
              "params": {"temperature": 0, "max_tokens": 1, "logprobs": 1,
                         "prompt_logprobs": 1}},
             {"name": "new", "model": new_weights, "prompts": PROMPTS, "params": GREEDY}]
    spec = {"cases": cases, "lm_eval": {"model": TINY, "task_dir": _task_dir(root),
                                        "tasks": TASKS}}
    (root / "spec.json").write_text(json.dumps(spec))
    proc = launch(1, ["tests.distributed.server_ref_job", str(root / "spec.json"),
                      str(root / "ref.json")], timeout=400,
                  env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads((root / "ref.json").read_text())
    out["task_dir"] = str(root)
    return out


def client(server: Server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def headers() -> dict:
    return {"Authorization": f"Bearer {KEY}"}


def post(server: Server, path: str, body, **kw) -> httpx.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=data, headers=headers(), timeout=120, **kw)


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    m = re.search(rf"^seesaw:{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def wait_idle(server: Server, timeout: float = 30.0) -> None:
    """Until no request is in flight and no KV block is held."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if metric(server, "num_requests") == 0 and metric(server, "kv_cache_usage_perc") == 0:
            return
        time.sleep(0.2)
    raise AssertionError("requests or KV blocks still held")


def close(a: list, b: list, tol: float) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


TOL = {"T1": 1e-5, "P2:T2": 1e-4}  # float32; P2:T2 sums in another order


# -- correctness -------------------------------------------------------------------------

@pytest.mark.parametrize("plan", ["T1", "P2:T2"])
@pytest.mark.parametrize("case", ["greedy", "seeded"])
def test_completions_equal_offline_generate(servers, ref, plan, case):
    s = servers[plan]
    params = GREEDY if case == "greedy" else SEEDED
    resp = client(s).completions.create(model="tiny-llama", prompt=PROMPTS, **params)
    assert [c.index for c in resp.choices] == list(range(len(PROMPTS)))
    for choice, want in zip(resp.choices, ref["cases"][case]):
        w = want["samples"][0]
        assert choice.text == w["text"], (plan, case)
        assert close(choice.logprobs.token_logprobs, w["logprobs"], TOL[plan])
        assert choice.finish_reason == w["finish_reason"]
    assert resp.usage.completion_tokens == sum(len(w["samples"][0]["token_ids"])
                                               for w in ref["cases"][case])
    assert resp.usage.prompt_tokens == sum(len(w["prompt_token_ids"])
                                           for w in ref["cases"][case])


@pytest.mark.parametrize("plan", ["T1", "P2:T2"])
def test_chat_equals_offline_chat(servers, ref, plan):
    c = client(servers[plan])
    for messages, want in zip(CHATS, ref["cases"]["chat"]):
        resp = c.chat.completions.create(model="tiny-llama", messages=messages,
                                         temperature=0, max_completion_tokens=12,
                                         logprobs=True, top_logprobs=2)
        choice = resp.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content == want["samples"][0]["text"]
        lps = [t.logprob for t in choice.logprobs.content]
        assert close(lps, want["samples"][0]["logprobs"], TOL[plan])
        assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
        assert resp.usage.prompt_tokens == len(want["prompt_token_ids"])


@pytest.mark.parametrize("plan", ["T1", "P2:T2"])
def test_streams_add_up_to_the_whole_response(servers, plan):
    c = client(servers[plan])
    whole = c.completions.create(model="tiny-llama", prompt=PROMPTS[:2], **SEEDED, n=2)
    parts: dict[int, str] = {}
    finish: dict[int, str] = {}
    usage = None
    for chunk in c.completions.create(model="tiny-llama", prompt=PROMPTS[:2], **SEEDED, n=2,
                                      stream=True, stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            parts[ch.index] = parts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert {ch.index: ch.text for ch in whole.choices} == parts
    assert {ch.index: ch.finish_reason for ch in whole.choices} == finish
    assert usage.completion_tokens == whole.usage.completion_tokens
    chat = c.chat.completions.create(model="tiny-llama", messages=CHATS[0], temperature=0,
                                     max_tokens=12)
    text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny-llama", messages=CHATS[0], temperature=0, max_tokens=12, stream=True)
        if ch.choices)
    assert text == chat.choices[0].message.content


def test_n_samples_and_echo_with_logprobs(servers, ref):
    c = client(servers["T1"])
    resp = c.completions.create(model="tiny-llama", prompt=PROMPTS[0], n=3, seed=5,
                                temperature=1.0, max_tokens=8)
    assert [ch.index for ch in resp.choices] == [0, 1, 2]
    assert len({ch.text for ch in resp.choices}) > 1  # three samples, not one thrice
    echo = c.completions.create(model="tiny-llama", prompt=PROMPTS[:2], temperature=0,
                                max_tokens=1, logprobs=1, echo=True)
    for ch, want in zip(echo.choices, ref["cases"]["echo"]):
        assert ch.text.startswith(PROMPTS[ch.index])
        lp = ch.logprobs.token_logprobs
        n = len(want["prompt_token_ids"])
        assert lp[0] is None and len(lp) == n + 1
        assert close(lp[1:n], want["prompt_logprobs"][1:], 1e-5)
        assert abs(lp[n] - want["samples"][0]["logprobs"][0]) < 1e-5


def test_lm_eval_local_completions_equals_the_in_process_backend(servers, ref):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tests.distributed.lm_eval_job import TASKS, summarize

    s = servers["T1"]
    args = (f"base_url={s.url}/v1/completions,model=tiny-llama,tokenizer_backend=huggingface,"
            f"tokenizer={TINY},add_bos_token=True,max_retries=1,num_concurrent=4,"
            "tokenized_requests=True,max_length=1024")
    res = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=TASKS,
                                  task_manager=TaskManager(include_path=ref["task_dir"]),
                                  log_samples=True, random_seed=0, numpy_random_seed=0,
                                  torch_random_seed=0, fewshot_random_seed=0)
    got, want = summarize(json.loads(json.dumps(res, default=str))), ref["lm_eval"]
    for doc, choices in want["samples"]["seesaw_mc"].items():
        for w, g in zip(choices, got["samples"]["seesaw_mc"][doc]):
            assert abs(float(w[0][0]) - float(g[0][0])) < 1e-4
            assert str(w[0][1]) == str(g[0][1])
    assert got["samples"]["seesaw_gen"] == want["samples"]["seesaw_gen"]
    for doc, w in want["samples"]["seesaw_ppl"].items():
        assert abs(float(w[0][0]) - float(got["samples"]["seesaw_ppl"][doc][0][0])) < 1e-3
    assert got["results"]["seesaw_mc"]["acc,none"] == want["results"]["seesaw_mc"]["acc,none"]


@pytest.mark.parametrize("plan", ["T1", "P2:T2"])
def test_generate_token_in_token_out(servers, ref, plan):
    want = ref["cases"]["greedy"]
    body = {"input_ids": [w["prompt_token_ids"] for w in want],
            "sampling_params": {"max_new_tokens": 12, "temperature": 0},
            "return_logprob": True}
    r = post(servers[plan], "/generate", body)
    assert r.status_code == 200, r.text
    for got, w in zip(r.json(), want):
        assert got["output_ids"] == w["samples"][0]["token_ids"]
        assert got["text"] == w["samples"][0]["text"]
        lps = [x[0] for x in got["meta_info"]["output_token_logprobs"]]
        assert close(lps, w["samples"][0]["logprobs"], TOL[plan])
        assert got["meta_info"]["prompt_tokens"] == len(w["prompt_token_ids"])
        assert got["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    one = post(servers[plan], "/generate", {"text": PROMPTS[0], "stream": True,
                                            "sampling_params": {"max_new_tokens": 12,
                                                                "temperature": 0}})
    events = [json.loads(x[6:]) for x in one.text.split("\n\n") if x.startswith("data: {")]
    assert events[-1]["text"] == want[0]["samples"][0]["text"]
    assert one.text.rstrip().endswith("data: [DONE]")


def test_256_concurrent_streaming_clients(servers, ref):
    s = servers["T1"]
    want = {p: w["samples"][0]["text"] for p, w in zip(PROMPTS, ref["cases"]["greedy"])}

    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, str, str | None, bool]:
        prompt = PROMPTS[i % len(PROMPTS)]
        body = {"model": "tiny-llama", "prompt": prompt, "stream": True, **GREEDY}
        text, reason, done = "", None, False
        async with http.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    ch = json.loads(line[6:])["choices"][0]
                    text += ch["text"]
                    reason = ch["finish_reason"] or reason
        return prompt, text, reason, done

    async def run():
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=s.url, limits=limits, timeout=300) as http:
            return await asyncio.gather(*(one(http, i) for i in range(256)))

    t0 = time.monotonic()
    results = asyncio.run(run())
    assert time.monotonic() - t0 < 240
    assert all(done and reason in ("stop", "length") and text == want[p]
               for p, text, reason, done in results)
    wait_idle(s)


# -- aborts --------------------------------------------------------------------------------

@pytest.mark.parametrize("plan", ["T1", "P2:T2"])
def test_client_disconnects_and_abort_free_every_block(servers, plan):
    s = servers[plan]
    long = {"model": "tiny-llama", "prompt": PROMPTS[0], "max_tokens": 1000,
            "ignore_eos": True, "temperature": 0}
    before = metric(s, "request_aborted_total")
    with httpx.Client(base_url=s.url, headers=headers(), timeout=60) as http:
        with http.stream("POST", "/v1/completions", json={**long, "stream": True}) as r:
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]  # three chunks, then hang up
            assert got[0].startswith("data: ")
    wait_idle(s)
    assert metric(s, "request_aborted_total") == before + 1
    with pytest.raises(httpx.ReadTimeout):  # a non-streamed request whose client gives up
        httpx.post(s.url + "/v1/completions", json=long, headers=headers(), timeout=0.3)
    wait_idle(s)
    assert metric(s, "request_aborted_total") == before + 2
    aborted = {}

    def gen() -> None:
        aborted["r"] = post(s, "/generate", {"text": PROMPTS[1], "rid": "to-abort",
                                             "sampling_params": {"max_new_tokens": 400,
                                                                 "ignore_eos": True}}).json()

    t = threading.Thread(target=gen)
    t.start()
    end = time.monotonic() + 30
    while metric(s, "num_requests") == 0 and time.monotonic() < end:
        time.sleep(0.05)
    assert post(s, "/abort_request", {"rid": "to-abort"}).json()["success"]
    t.join(30)
    assert aborted["r"]["meta_info"]["finish_reason"] == {"type": "abort"}
    assert len(aborted["r"]["output_ids"]) < 400
    wait_idle(s)
    assert metric(s, "request_aborted_total") == before + 3


# -- RL: pause, weight updates, continue -------------------------------------------------------

def _greedy_ids(s: Server, want) -> list[list[int]]:
    body = {"input_ids": [w["prompt_token_ids"] for w in want],
            "sampling_params": {"max_new_tokens": 12, "temperature": 0}}
    r = post(s, "/generate", body)
    assert r.status_code == 200, r.text
    return [g["output_ids"] for g in r.json()]


def test_pause_update_from_a_trainer_and_from_disk_continue(servers, ref, new_weights):
    from tests.conftest import free_test_port
    from tests.distributed.training_loop_job import tensors

    s = servers["P2:T2"]
    old = [w["samples"][0]["token_ids"] for w in ref["cases"]["greedy"]]
    new = [w["samples"][0]["token_ids"] for w in ref["cases"]["new"]]
    assert old != new
    kept = {}

    def long() -> None:
        kept["r"] = post(s, "/generate", {"text": PROMPTS[2], "sampling_params": {
            "max_new_tokens": 200, "ignore_eos": True, "temperature": 0}}).json()

    t = threading.Thread(target=long)
    t.start()
    time.sleep(0.5)
    assert post(s, "/pause_generation", {"mode": "keep"}).json()["success"]
    assert metric(s, "engine_paused") == 1
    # from disk: every rank reads the folder
    r = post(s, "/update_weights_from_disk", {"model_path": new_weights})
    assert r.status_code == 200 and r.json()["success"], r.text
    assert post(s, "/continue_generation", {}).json()["success"]
    t.join(120)
    assert kept["r"]["meta_info"]["completion_tokens"] == 200
    assert _greedy_ids(s, ref["cases"]["new"]) == new
    # from a trainer's process group: the original weights come back
    port = free_test_port()
    trainer = subprocess.Popen([sys.executable, "-m", "tests.distributed.trainer_stub",
                                "127.0.0.1", str(port), "3", TINY], cwd=REPO, env=launch_env())
    try:
        r = post(s, "/init_weights_update_group", {
            "master_address": "127.0.0.1", "master_port": port, "rank_offset": 1,
            "world_size": 3, "group_name": "g", "backend": "gloo"})
        assert r.json()["success"], r.text
        pairs = tensors(TINY)
        r = post(s, "/update_weights_from_distributed", {
            "names": [n for n, _ in pairs], "dtypes": [str(t.dtype) for _, t in pairs],
            "shapes": [list(t.shape) for _, t in pairs], "group_name": "g"})
        assert r.json()["success"], r.text
        assert trainer.wait(60) == 0
    finally:
        trainer.kill()
    assert _greedy_ids(s, ref["cases"]["greedy"]) == old
    info = httpx.get(s.url + "/get_model_info", headers=headers()).json()
    assert info["weights_version"] >= 2 and info["plan"] == "P2 -> T2"


def test_sleep_wake_up_and_reset_prefix_cache(servers, ref):
    s = servers["T1"]
    assert post(s, "/sleep?level=1", b"").json()["success"]
    assert httpx.get(s.url + "/is_sleeping").json() == {"is_sleeping": True}
    assert post(s, "/wake_up", b"").json()["success"]
    assert httpx.get(s.url + "/is_sleeping").json() == {"is_sleeping": False}
    assert post(s, "/reset_prefix_cache", b"").json()["success"]
    assert _greedy_ids(s, ref["cases"]["greedy"]) == [
        w["samples"][0]["token_ids"] for w in ref["cases"]["greedy"]]


# -- bad input -------------------------------------------------------------------------------

BAD = [  # (path, body, status, message: its start; ".*" stands for any text)
    ("/v1/completions", b"{not json", 400, "malformed JSON: "),
    ("/v1/completions", b"", 400, "the request body is empty: send a JSON object"),
    ("/v1/completions", b"[1, 2]", 400, "the request body must be a JSON object"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt: field required"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400,
     "max_tokens: input should be a valid integer"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400,
     "temperature must be a finite number >= 0, got -1"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400,
     "top_p must be a number in (0, 1], got 1.5"),
    ("/v1/completions", {"prompt": "x", "logprobs": 21}, 400,
     "logprobs must be between 0 and 20, got 21"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n must be an integer >= 1, got 0"),
    ("/v1/completions", {"prompt": [5] * 1100}, 400,
     "request 'cmpl-.*' has 1100 tokens; the model's context is 1024 (prompt + at least one "
     "generated token must fit)"),
    ("/v1/completions", {"prompt": [999999]}, 400,
     "request 'cmpl-.*': token id 999999 is outside the vocabulary [0, 2048)"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404,
     "The model `gpt-4` does not exist (this server serves `tiny-llama`)"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages: "),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "top_logprobs": 2}, 400,
     "top_logprobs needs logprobs=true"),
    ("/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 0}}, 400,
     "sampling_params.max_tokens must be an integer >= 1, got 0"),
    ("/generate", {"input_ids": [1], "sampling_params": {"bogus": 1}}, 400,
     "unknown sampling parameter sampling_params.bogus"),
    ("/generate", {"sampling_params": {}}, 400, "give exactly one of text and input_ids"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens: token id -1 is outside the vocabulary"),
    ("/pause_generation", {"mode": "sideways"}, 400, "mode: input should be "),
    ("/update_weights_from_disk", {"model_path": "/no/such/folder"}, 400,
     "model path '/no/such/folder' is not a directory"),
    ("/update_weights_from_distributed", {"names": ["a"], "dtypes": ["float99"],
                                          "shapes": [[1]]}, 400,
     "dtypes: 'float99' is not a torch dtype"),
    ("/sleep?level=7", b"", 400, "sleep: level must be 1 or 2, got 7"),
]


@pytest.mark.parametrize("path, body, status, message", BAD,
                         ids=[f"{i}{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input_is_refused_with_one_line(servers, ref, path, body, status, message):
    s = servers["T1"]
    r = post(s, path, body)
    assert r.status_code == status, r.text
    j = r.json()
    text = j["error"]["message"] if "error" in j else j["message"]
    assert re.match(re.escape(message).replace(r"\.\*", ".*"), text), text
    assert "\n" not in text
    if "error" in j:
        assert j["error"]["code"] == status
    # the engine is unharmed
    assert _greedy_ids(s, ref["cases"]["greedy"][:1]) == [
        ref["cases"]["greedy"][0]["samples"][0]["token_ids"]]


def test_weights_of_another_model_are_refused(servers, ref, tiny_models):
    s = servers["T1"]
    other = tiny_models["llama"]  # the same architecture, other sizes
    r = post(s, "/update_weights_from_disk", {"model_path": other})
    assert r.status_code == 400
    assert r.json() == {"success": False, "message": f"{other} is not a checkpoint of this "
                        "model: its vocab_size is 250, the engine's is 2048"}
    assert _greedy_ids(s, ref["cases"]["greedy"]) == [
        w["samples"][0]["token_ids"] for w in ref["cases"]["greedy"]]


def test_unknown_fields_are_ignored_with_a_warning(servers, ref):
    s = servers["T1"]
    r = post(s, "/v1/completions", {"prompt": PROMPTS[0], "frobnicate": 3, **GREEDY})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == ref["cases"]["greedy"][0]["samples"][0]["text"]
    line = "warning: ignored request fields this server does not know: frobnicate"
    deadline = time.monotonic() + 10  # the log reaches us through the launcher's pipe
    while line not in s.log and time.monotonic() < deadline:
        time.sleep(0.1)
    assert line in s.log


def test_api_key(servers):
    s = servers["P2:T2"]
    for h in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x"}, headers=h)
        assert r.status_code == 401
        assert r.json()["error"]["message"] == ("missing or wrong API key "
                                                "(Authorization: Bearer <key>)")
    assert httpx.get(s.url + "/health").status_code == 200  # open
    assert httpx.get(s.url + "/v1/models", headers=headers()).json()["data"][0]["id"] == \
        "tiny-llama"
    tok = post(s, "/tokenize", {"prompt": "Hello there"}).json()
    assert post(s, "/detokenize", {"tokens": tok["tokens"]}).json()["prompt"].endswith(
        "Hello there") and tok["count"] == len(tok["tokens"])


def test_a_full_queue_is_refused_at_once(servers):
    s = servers["P2:T2"]
    assert post(s, "/pause_generation", {"mode": "keep"}).json()["success"]
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(post(
        s, "/generate", {"text": PROMPTS[i], "sampling_params": {"max_new_tokens": 4}})))
        for i in range(4)]
    for t in threads:
        t.start()
    end = time.monotonic() + 30
    while metric(s, "num_requests") < 4 and time.monotonic() < end:
        time.sleep(0.05)
    t0 = time.monotonic()
    r = post(s, "/generate", {"text": "one too many"})
    assert r.status_code == 503 and time.monotonic() - t0 < 5
    assert r.json()["error"]["message"] == ("the server's queue is full (4 requests waiting); "
                                            "retry later")
    assert post(s, "/continue_generation", {}).json()["success"]
    for t in threads:
        t.join(60)
    assert [x.status_code for x in results] == [200] * 4
    wait_idle(s)


# -- OpenAI batch files offline (launch/infer.py data.format=openai_batch) ---------------------

def test_openai_batch_file_answers_like_the_server_and_resumes(servers, ref, tmp_path):
    """Run before the servers end: the same bodies through the T1 server and a batch file
    on two ranks (P2:T2) get the same answers and the same refusals; a killed run's torn
    output resumes with every line once."""
    bodies = {
        "greedy": ("/v1/completions", {"model": "tiny-llama", "prompt": PROMPTS, **GREEDY}),
        "chat": ("/v1/chat/completions", {"messages": CHATS[1], "temperature": 0,
                                          "max_tokens": 12}),
        "seeded-n": ("/v1/completions", {"prompt": PROMPTS[:2], "n": 2, **SEEDED}),
        "bad-top-p": ("/v1/completions", {"prompt": "x", "top_p": 2}),
        "bad-model": ("/v1/completions", {"prompt": "x", "model": "gpt-4"}),
    }
    lines = [{"custom_id": cid, "method": "POST", "url": url, "body": body}
             for cid, (url, body) in bodies.items()]
    lines.append({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings",
                  "body": {}})
    src, out = tmp_path / "batch.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines) + "{torn\n")
    args = ["launch.infer", "plan=P2:T2", "dtype=float32", "data.format=openai_batch",
            f"data.input={src}", f"data.output={out}", "progress=false"]
    proc = launch(2, args, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    server = {cid: post(servers["T1"], url, body) for cid, (url, body) in bodies.items()}
    assert errors == [
        f"error: {src}:4: {server['bad-top-p'].json()['error']['message']}",
        f"error: {src}:5: {server['bad-model'].json()['error']['message']}",
        f"error: {src}:6: url must be one of /v1/completions, /v1/chat/completions, got "
        "'/v1/embeddings'",
        f"error: {src}:7: invalid JSON (Expecting property name enclosed in double quotes "
        "at column 2)"]
    got = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(got) == ["chat", "greedy", "seeded-n"]
    for cid, rec in got.items():
        assert rec["response"]["status_code"] == 200 and rec["error"] is None
        body, want = rec["response"]["body"], server[cid].json()
        assert rec["id"].startswith("batch_req_") and body["object"] == want["object"]
        key = "message" if cid == "chat" else "text"
        assert [c[key] for c in body["choices"]] == [c[key] for c in want["choices"]], cid
        assert body["usage"] == want["usage"]
    assert [c["text"] for c in got["greedy"]["response"]["body"]["choices"]] == [
        w["samples"][0]["text"] for w in ref["cases"]["greedy"]]
    # a torn output (a killed run) resumes: the complete lines stay, the rest run once
    text = out.read_text().splitlines(keepends=True)
    out.write_text(text[0] + text[1][:40])
    proc = launch(2, args, timeout=300)
    assert proc.returncode == 1 and "resuming" in proc.stdout, proc.stderr[-3000:]
    again = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
    assert sorted(again) == ["chat", "greedy", "seeded-n"]


# -- the end: SIGTERM, a failed rank (each ends its server) -----------------------------------

def test_sigterm_finishes_the_request_in_flight_and_exits_0(servers):
    s = servers["T1"]
    got = {}

    def long() -> None:
        got["r"] = httpx.post(s.url + "/v1/completions", timeout=120, json={
            "prompt": PROMPTS[0], "max_tokens": 300, "ignore_eos": True, "temperature": 0})

    t = threading.Thread(target=long)
    t.start()
    end = time.monotonic() + 30
    while metric(s, "num_requests") == 0 and time.monotonic() < end:
        time.sleep(0.05)
    os.kill(s.proc.pid, signal.SIGTERM)
    t.join(120)
    assert got["r"].status_code == 200
    assert got["r"].json()["usage"]["completion_tokens"] == 300
    assert s.wait(60) == 0, s.log[-3000:]
    assert "server stopped" in s.log
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health")


def test_a_failed_rank_stops_the_server_non_zero(servers):
    s = servers["P2:T2"]
    t0 = time.monotonic()
    os.kill(s.pid_of_rank(1), signal.SIGKILL)
    code = s.wait(90)
    assert code != 0 and time.monotonic() - t0 < 90, s.log[-3000:]
    assert "error: rank 1 exited" in s.log or "error: the engine failed" in s.log, s.log[-3000:]

