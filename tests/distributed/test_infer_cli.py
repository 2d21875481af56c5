"""launch/infer.py end to end on the bundled tokenizer model: greedy parity with HF generate
under the launcher, output written per request, and every bad input -> one clear error."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from tests.conftest import REPO, error_lines, launch

TINY = os.path.join(REPO, "models", "tiny-llama")
TEXTS = ["Return the number of", "This module provides a", "If the file does not exist, the",
         "Create a new", "The default value is the number of bytes in the buffer", "Convert"]


def infer(world: int, *overrides: str, timeout: float = 300):
    return launch(world, ["launch.infer", *overrides], timeout=timeout)


class _Run:
    """One case of ``cli_batch``: what a ``launch`` result offers the tests, and the case's
    folder (``OUT`` in its overrides)."""

    def __init__(self, rec: dict, folder) -> None:
        self.returncode, self.stdout, self.stderr = rec["code"], rec["stdout"], rec["stderr"]
        self.dir = folder


_BATCH: dict[str, list[str]] = {}  # case name -> overrides, filled at collection


def batched(name: str, *overrides: str) -> str:
    """Registers a single-rank case for the module's one ``cli_batch`` process."""
    _BATCH[name] = list(overrides)
    return name


def _run_batch(world: int, cases: dict[str, list[str]], tmp_path_factory) -> dict[str, _Run]:
    """``cases`` run by ``tests/distributed/cli_batch.py`` in one job of ``world`` ranks,
    each case's files in its own folder (``OUT`` in its overrides)."""
    root = tmp_path_factory.mktemp("batch")
    cases = {k: [o.replace("OUT", str(root / k)) for o in v] for k, v in cases.items()}
    for k in cases:
        (root / k).mkdir()
    (root / "cases.json").write_text(json.dumps(list(cases.values())))
    proc = launch(world, ["tests.distributed.cli_batch", str(root / "cases.json"),
                          str(root / "out.json")], timeout=600, launcher="ds-launch")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = json.loads((root / "out.json").read_text())
    return {k: _Run(r, root / k) for k, r in zip(cases, recs)}


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict[str, _Run]:
    """Every registered single-rank case, in one process."""
    return _run_batch(1, _BATCH, tmp_path_factory)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "in.jsonl"
    lines = [json.dumps({"id": f"p{i}", "prompt": t}) for i, t in enumerate(TEXTS)]
    lines.insert(2, '{"id": "broken", "prompt": ')  # line 3: malformed
    lines.insert(5, json.dumps({"id": "empty", "prompt": ""}))  # line 6: empty prompt
    lines.append(json.dumps({"id": "chat", "messages": [{"role": "user", "content": "Hi"}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def t2_run(prompts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "out.jsonl"
    proc = infer(2, "plan=t2", f"data.input={prompts_file}", f"data.output={out}",
                 "sampling.max_tokens=16", "cache.num_blocks=10", "cache.block_size=4")
    return proc, out


def test_bad_lines_reported_valid_lines_kept(t2_run, prompts_file):
    proc, out = t2_run
    assert proc.returncode == 1
    errs = error_lines(proc)
    assert len(errs) == 2
    assert errs[0].startswith(f"error: {prompts_file}:3: invalid JSON")
    assert errs[1] == f"error: {prompts_file}:6: 'prompt' is empty"
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == sorted([f"p{i}" for i in range(len(TEXTS))] + ["chat"])
    assert "generated" in proc.stdout and "requests" in proc.stderr  # report + tqdm bar


def test_greedy_matches_hf_generate(t2_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out = t2_run
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    tok = AutoTokenizer.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    for i, text in enumerate(TEXTS):
        ids = torch.tensor([tok(text)["input_ids"]])
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=16)[0, ids.shape[1]:].tolist()
        row = rows[f"p{i}"]
        assert row["token_ids"] == ref, text
        assert row["text"] == tok.decode(ref, skip_special_tokens=True)
        assert row["finish_reason"] == ("stop" if ref[-1] == tok.eos_token_id else "length")


def test_chat_record_uses_template(t2_run):
    from transformers import AutoTokenizer

    _, out = t2_run
    row = next(r for r in map(json.loads, out.read_text().splitlines()) if r["id"] == "chat")
    tok = AutoTokenizer.from_pretrained(TINY)
    want = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
                                   add_generation_prompt=True, tokenize=True)
    want = want["input_ids"] if not isinstance(want, list) else want
    assert row["prompt_token_ids"] == list(want)


def test_demo_defaults_single_process(batch):
    proc = batch[DEMO]
    out = proc.dir / "demo.jsonl"
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(out.read_text().splitlines()) == 12
    assert "seesaw_mcore run report (T1, 12 requests" in proc.stdout


DEMO = batched("demo", "data.output=OUT/demo.jsonl")

ERRORS = [
    (["sampling.max_tokens=0"], "error: SamplingParams.max_tokens must be an integer >= 1, got 0"),
    (["plan=t2"], "error: layout T2 needs DP x TP x PP = 1 x 2 x 1 = 2 ranks, but the world "
                  "size is 1"),
    (["data.input=/nonexistent.jsonl"], "error: data.input '/nonexistent.jsonl' does not exist"),
    (["plan=p2_t2"], "error: layout P2 needs DP x TP x PP = 1 x 1 x 2 = 2 ranks, but the world "
                     "size is 1"),
    (["plan=P2:T4"], "error: plan P2 -> T4: prefill uses 2 ranks but decode uses 4; both "
                     "phases run on the same ranks"),
    (["plan=P4:T4"], "error: layout T4: TP=4 does not divide num_key_value_heads=2"),
    (["plan=P8:T8"], "error: layout P8: PP=8 is greater than num_hidden_layers=5"),
    (["plan=T3"], "error: layout T3: TP=3 does not divide num_attention_heads=4"),
    (["plan=P2:T2:T4"], "error: invalid plan 'P2:T2:T4': expected a layout ('T2') or "
                        "prefill:decode ('P2:T2')"),
    (["plan=X2"], "error: invalid parallel layout 'X2': expected e.g. 'T2', 'P4', 'D2P2', "
                  "'T2P2'"),
    (["cache.disk_path=/tmp"], "error: cache.disk_path needs a re-sharding plan; plan T1 is "
                               "static (its KV stays on the device)"),
    (["data.prompt_template=Question"], "error: data.prompt_template must contain {prompt}"),
    (["enable_return_routed_experts=true"], "error: enable_return_routed_experts needs a "
     "mixture-of-experts model; LlamaForCausalLM has no experts"),
    (["logprobs_mode=processed"], "error: logprobs_mode must be one of raw_logprobs, raw_logits, "
     "processed_logprobs, processed_logits, got 'processed'"),
]


@pytest.mark.parametrize("case,message", [
    (batched(f"errors{i}", "data.output=OUT/o.jsonl", *o), m) for i, (o, m) in enumerate(ERRORS)])
def test_errors(batch, case, message):
    proc = batch[case]
    assert proc.returncode == 1
    assert error_lines(proc) == [message]


def test_hydra_type_checks_overrides(tmp_path):
    proc = infer(1, f"data.output={tmp_path / 'o.jsonl'}", "cache.num_blocks=abc", timeout=120)
    assert proc.returncode == 1
    assert "Value 'abc' of type 'str' could not be converted to Integer" in proc.stderr


SAMPLE = "data/sample_prompts.jsonl"  # as the tests' working directory (REPO) names it


@pytest.mark.parametrize("case,message", [
    (batched("max_len", "data.output=OUT/o.jsonl", f"data.input={SAMPLE}",
             "model.max_model_len=3"),
     "prompt has N tokens; the model's context is 3 "
     "(prompt + at least one generated token must fit)"),
    (batched("kv_fit", "data.output=OUT/o.jsonl", f"data.input={SAMPLE}", "cache.num_blocks=1",
             "cache.block_size=4"),
     "prompt needs up to N tokens of KV cache (prompt N + max_tokens N) but the "
     "cache holds 4; raise cache.num_blocks / cache.kv_cache_gib or lower max_tokens"),
])
def test_prompts_that_cannot_run_are_reported_per_record(batch, case, message):
    """None of the 12 sample prompts fits: each is rejected with its id, and the run still
    ends cleanly with exit 1 and an empty output."""
    proc = batch[case]
    out = proc.dir / "o.jsonl"
    assert proc.returncode == 1
    errs = error_lines(proc)
    ids = [json.loads(line)["id"] for line in open(SAMPLE)]
    pattern = re.escape(message).replace("N", r"\d+")
    assert len(errs) == len(ids)
    for line, i in zip(errs, ids):
        assert re.fullmatch(re.escape(f"error: {SAMPLE}: id {i!r}: ") + pattern, line), line
    assert out.read_text() == ""


UNKNOWN = batched("unknown_key", "sampling.temprature=0")
KV_MEMORY = batched("kv_memory", "data.output=OUT/o.jsonl", "cache.kv_cache_gib=100000")


def test_unknown_hydra_key(batch):
    proc = batch[UNKNOWN]
    assert proc.returncode != 0
    assert "Could not override 'sampling.temprature'" in proc.stderr


def test_kv_budget_larger_than_memory(batch):
    proc = batch[KV_MEMORY]
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert line.startswith("error: cache.kv_cache_gib=100000 x 1 ranks needs 100000.0 GiB but "
                           "the node has ")
    assert line.endswith("GiB available; lower cache.kv_cache_gib")


STOPS = batched("stops", "data.output=OUT/o.jsonl", "sampling=random", "sampling.n=3",
                "sampling.seed=5", 'sampling.stop=["."]', "sampling.max_tokens=24")


def test_stop_strings_and_n_samples(batch):
    from transformers import AutoTokenizer

    proc = batch[STOPS]
    out = proc.dir / "o.jsonl"
    assert proc.returncode == 0, proc.stderr[-2000:]
    tok = AutoTokenizer.from_pretrained(TINY)
    stopped, distinct = 0, 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows:
        assert row["n"] == 3 and len(row["outputs"]) == 3
        assert row["num_prompt_tokens"] == len(row["prompt_token_ids"]) > 0
        assert all(o["num_tokens"] == len(o["token_ids"]) for o in row["outputs"])
        distinct += len({tuple(o["token_ids"]) for o in row["outputs"]}) > 1
        for o in row["outputs"]:
            full = tok.decode(o["token_ids"], skip_special_tokens=True)
            assert "." not in o["text"]
            if o["finish_reason"] == "stop" and "." in full:
                stopped += 1
                assert o["text"] == full[: full.index(".")]
    assert stopped > 0
    assert distinct > len(rows) // 2  # the n samples are separate draws


@pytest.fixture(scope="module")
def seesaw_run(prompts_file, tmp_path_factory):
    """P2 -> T2 with a host tier of 26 tokens: the prompts need several prefill phases. Run
    under torchrun (the static T2 run it is compared with is under the deepspeed launcher):
    torchrun names the node's rank count ``LOCAL_WORLD_SIZE``, DeepSpeed's launcher
    ``LOCAL_SIZE``, which DeepSpeed's shm all-reduce reads - without it the op was used
    uninitialised and every rank crashed."""
    out = tmp_path_factory.mktemp("cli") / "out.jsonl"
    proc = launch(2, ["launch.infer", "plan=P2:T2", f"data.input={prompts_file}",
                      f"data.output={out}", "sampling.max_tokens=16", "cache.num_blocks=10",
                      "cache.block_size=4", "cache.host_kv_tokens=26"], launcher="torchrun")
    return proc, out


def _outputs_by_id(path) -> dict[str, list]:
    return {r["id"]: r["outputs"] for r in map(json.loads, path.read_text().splitlines())}


def test_seesaw_plan_same_outputs_as_static(seesaw_run, t2_run):
    proc, out = seesaw_run
    assert proc.returncode == 1, proc.stderr[-3000:]  # the two bad input lines, as under T2
    assert "seesaw_mcore run report (P2 -> T2, 7 requests" in proc.stdout
    switches = int(proc.stdout.split("  switches ")[1].split()[0])
    assert switches >= 3
    assert "switch P2 -> T2 (decode)" in proc.stdout  # each switch is logged
    assert _outputs_by_id(out) == _outputs_by_id(t2_run[1])


TIER_ERRORS = {  # the one that fails after the run (a rejected prompt) last: it shuts down
    "host_gib": (["cache.host_kv_gib=100000"], "error: host KV tier needs 100000.00 GiB but only "),
    "disk_dir": (["cache.disk_path=/nonexistent/dir"],
                 "error: cache.disk_path '/nonexistent/dir' is not a directory"),
    "disk_gib": (["cache.disk_path=OUT", "cache.disk_kv_gib=100000"],
                 "error: disk KV tier needs 100000.00 GiB but OUT has only "),
    "prompt": (["cache.host_kv_tokens=8", "sampling.max_tokens=8"],
               f"error: {SAMPLE}: id 'doc-1': prompt needs up to 11 token slots of the host KV "
               "tier (prompt 4 + max_tokens 8 - 1, if preempted) but it holds 8; raise "
               "cache.host_kv_tokens / cache.host_kv_gib or lower max_tokens"),
}


@pytest.fixture(scope="module")
def tier_batch(tmp_path_factory) -> dict[str, _Run]:
    """The two-rank tier-error cases, run by ``cli_batch`` in one two-rank job."""
    return _run_batch(2, {k: ["plan=p2_t2", "data.output=OUT/o.jsonl", *o]
                          for k, (o, _) in TIER_ERRORS.items()}, tmp_path_factory)


@pytest.mark.parametrize("case", list(TIER_ERRORS))
def test_tier_errors_two_ranks(tier_batch, case):
    proc = tier_batch[case]
    message = TIER_ERRORS[case][1].replace("OUT", str(proc.dir))
    assert proc.returncode == 1
    line, *rest = error_lines(proc)  # a prompt that cannot fit: one line per sample prompt
    assert len(rest) == (11 if "prompt needs" in message else 0)
    assert line.startswith(message)
    if "100000" in message:
        tier = "disk" if "disk" in message else "host"
        assert line.endswith(f"; lower cache.{tier}_kv_tokens or cache.{tier}_kv_gib")
    assert list(proc.dir.glob("seesaw_kv_*")) == []


def test_plan_auto_measures_once_logs_and_runs(tmp_path):
    cache = tmp_path / "cache"
    out = tmp_path / "o.jsonl"
    runs = []
    for blocks in (10, 200):  # the first measures this machine and caches it; the second
        # reuses it, with room for every request: the trial's plan moves are no preemptions
        proc = launch(2, ["launch.infer", "plan=auto", "workload=16:16", "sampling.max_tokens=16",
                          f"cache.num_blocks={blocks}", "cache.block_size=4",
                          f"data.output={out}", "data.overwrite=true"],
                      timeout=240, env={"SEESAW_CACHE_DIR": str(cache)})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        runs.append(proc.stdout + proc.stderr)
    assert "| preemptions 0 (0 swapped)" in runs[1]
    [profile] = cache.glob("profile-*.json")
    fields = json.loads(profile.read_text())
    assert fields["name"] == "measured (2 cpu ranks)" and fields["tflops"] > 0
    assert fields["allreduce_gbs"] > 0 and fields["p2p_gbs"] > 0
    # the calibration timed the engine: a step and a layer cost something on CPU ranks
    assert fields["step_s"] > 0 and fields["layer_s"] > 0 and fields["attn_gbs"] > 0
    assert not fields["switch_copies_weights"]
    for text in runs:
        [line] = [x for x in text.splitlines() if "plan=auto (measured (2 cpu ranks), workload "
                  "16:16): " in x]
        assert "predicted" in line and "trial candidates" in line
        assert ("plan=auto trial: continuing on" in text  # 12 requests, 16 tokens: the job
                or "plan=auto trial: the run ended during the trial" in text)  # may end first
        # the calibration's and the trial's switches are measurements, not the job's lines
        decided = [i for i, x in enumerate(text.splitlines()) if "plan=auto trial: " in x]
        assert not [x for x in text.splitlines()[:decided[0]] if "switch " in x]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 12 and all(r["text"] for r in rows)


SAMPLED = ["sampling.max_tokens=16", "sampling.temperature=0.8", "sampling.n=2"]


def test_rerun_after_a_kill_resumes_without_loss_or_duplicates(tmp_path):
    """Random sampling, two samples each: seeds come from (engine seed, id, sample), so the
    resumed run's records equal the uninterrupted run's."""
    full = tmp_path / "full.jsonl"
    proc = infer(1, f"data.output={full}", *SAMPLED)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = full.read_text().splitlines(keepends=True)
    assert len(lines) == 12
    killed = tmp_path / "killed.jsonl"  # what a run killed mid-write leaves
    killed.write_text("".join(lines[:5]) + lines[5][:20])
    proc = infer(1, f"data.output={killed}", *SAMPLED)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resuming" in proc.stdout and "5 ids already done; dropped a torn last line " \
        "(20 bytes); running the rest" in proc.stdout
    assert "resumed: 5 of 12 ids were done before this run" in proc.stdout
    after = killed.read_text().splitlines(keepends=True)
    assert after[:5] == lines[:5]  # finished records untouched
    by_id = {json.loads(x)["id"]: json.loads(x) for x in after}
    assert len(after) == len(by_id) == 12  # every id once
    for x in lines:
        ref = json.loads(x)
        got = by_id[ref["id"]]["outputs"]
        assert [o["token_ids"] for o in got] == [o["token_ids"] for o in ref["outputs"]]
    assert any(len({tuple(o["token_ids"]) for o in json.loads(x)["outputs"]}) == 2
               for x in lines)  # real random draws: the two samples differ
    proc = infer(1, f"data.output={killed}", *SAMPLED, "data.overwrite=true")
    assert proc.returncode == 0 and "resuming" not in proc.stdout
    assert len(killed.read_text().splitlines()) == 12


def test_output_errors_end_every_rank():
    proc = infer(2, "plan=t2", "data.output=/nonexistent/dir/o.jsonl", timeout=180)
    assert proc.returncode == 1
    assert error_lines(proc) == ["error: data.output '/nonexistent/dir/o.jsonl': directory "
                                 "'/nonexistent/dir' does not exist"]


def test_hostile_input_file_runs_every_valid_record(tmp_path):
    """Random bytes, invalid UTF-8, wrong types, a truncated line, deep nesting, a duplicate
    id, a 1 MB prompt and bad chat records among 8 valid ones: the valid ones all run, each
    bad one is one error line naming its line or id, and nothing crashes."""
    import random

    rng = random.Random(0)
    valid = [{"id": f"ok-{i}", "prompt": f"Return the number {i} of"} for i in range(6)]
    valid += [{"id": "chat-ok", "messages": [{"role": "user", "content": "Hi"}]},
              {"prompt": "no id here"}]
    bad = [bytes(rng.randrange(256) for _ in range(40)).replace(b"\n", b" "),
           b'{"id": "u", "prompt": "caf\xe9"}', b'{"id": 1.5, "prompt": "x"}',
           b'{"id": "t", "prompt": ["a"]}', b"[" * 50000, b'{"id": "ok-0", "prompt": "dup"}',
           json.dumps({"id": "huge", "prompt": "word " * 200000}).encode(),
           b'{"id": "c1", "messages": [{"role": "user"}]}', b'{"id": "c2", "messages": []}',
           b'{"id": "trunc", "prompt": "cut']
    lines = [json.dumps(v).encode() for v in valid] + bad
    rng.shuffle(lines)
    path = tmp_path / "hostile.jsonl"
    path.write_bytes(b"\n".join(lines))  # no final newline: the last line may be cut
    out = tmp_path / "o.jsonl"
    proc = infer(1, f"data.input={path}", f"data.output={out}", "sampling.max_tokens=4",
                 timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    no_id = f"line-{lines.index(json.dumps(valid[-1]).encode()) + 1}"
    assert sorted(r["id"] for r in rows) == sorted([v["id"] for v in valid[:-1]] + [no_id])
    errs = error_lines(proc)
    assert len(errs) == len(bad), errs
    assert any("id 'huge': prompt has " in e for e in errs)
    assert any(": duplicate id 'ok-0'" in e for e in errs)
    assert any(": invalid UTF-8 (byte 0xe9 at byte " in e for e in errs)
    assert any(": invalid JSON (nested too deeply)" in e for e in errs)


def _truncate(model) -> None:
    f = model / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size * 2 // 3])


def _lie_about_heads(model) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    (model / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("world,corrupt,message", [
    (2, _truncate, r"error: checkpoint file .*model.safetensors is truncated or corrupt: "),
    (1, _lie_about_heads, r"error: tensor model.layers.0.self_attn.k_proj.weight has shape "
                          r"\[\d+, \d+\] but config.json implies \[\d+, \d+\]"),
])
def test_corrupt_checkpoint_fails_before_generation(tmp_path, world, corrupt, message):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    corrupt(model)
    out = tmp_path / "o.jsonl"
    proc = infer(world, f"model.path={model}", f"data.output={out}", "plan=t2" if world == 2
                 else "plan=t1", timeout=180)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    [line] = error_lines(proc)
    assert re.match(message, line), line
    assert not out.exists() or out.read_text() == ""
