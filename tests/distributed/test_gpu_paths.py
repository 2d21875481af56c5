"""The GPU-only paths, checked on CPU ranks: KV sizing by a profiling run (fake device
memory, several engines in one process) and the copy thread's device."""

from __future__ import annotations

import threading

import pytest

from seesaw_mcore.kv.transfer import CopyQueue
from tests.conftest import launch_job

GIB = 2**30


@pytest.fixture(scope="module")
def sizing(tiny_models, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("sizing") / "report.json"
    return launch_job(2, "tests.distributed.kv_sizing_job", out, [tiny_models["llama"]])


def test_profiled_cache_takes_what_the_utilization_leaves(sizing):
    from tests.distributed.kv_sizing_job import ACTIVATIONS, CONTEXT, TOTAL

    e = sizing["engine0"]
    assert e["profiles"] == 2  # both layouts of P2:T2 ran the largest step
    assert ACTIVATIONS <= e["activations"] < ACTIVATIONS + 2**20
    assert CONTEXT < e["used"] < CONTEXT + 64 * 2**20  # the context and the weights
    assert e["min_budget"] > 0
    for lay, n in e["blocks"].items():  # every rank's smallest budget, in whole blocks
        assert n == e["min_budget"] // e["bpb"][lay]
    assert e["min_budget"] < TOTAL * 0.5 - e["used"] - ACTIVATIONS + 1


def test_engines_one_after_another_get_the_same_cache(sizing):
    """``close`` returns the KV cache and the allocator's cache: the second engine in the
    process sizes its cache from the same free memory as the first."""
    a, b = sizing["engine0"], sizing["engine1"]
    # the 0.2 GiB cache is returned; what stays is module-level scratch (RoPE tables, ...)
    assert a["reserved_after_close"] < 2**20 and b["reserved_after_close"] < 2**20
    assert a["min_budget"] > 0.2 * GIB
    for lay, n in a["blocks"].items():  # without the release it would be ~half
        assert abs(b["blocks"][lay] - n) <= n // 1000
    assert a["tokens"] == b["tokens"] == sizing["reference"]  # and they run


def test_too_little_memory_is_one_clear_error(sizing):
    assert sizing["small"].startswith(
        "no GPU memory left for the KV cache: 0.50 GiB x gpu_memory_utilization 0.01 = "
        "0.01 GiB, of which ")
    assert sizing["small"].endswith("raise cache.gpu_memory_utilization, lower "
                                    "scheduler.max_prefill_tokens / max_num_seqs, or use "
                                    "more ranks")


def test_an_explicit_budget_is_honoured_without_profiling(sizing):
    e = sizing["explicit"]
    assert e["profiled"] == 0 and not e["profile"]
    bpb = sizing["engine0"]["bpb"]
    for lay, n in e["blocks"].items():
        assert n == (GIB // 1024) // bpb[lay]


@pytest.mark.parametrize("plan", ["T2", "P2:T2"])
def test_decode_padded_to_graph_buckets_changes_nothing(sizing, plan):
    """The CUDA-graph path's padding (one-token rows on the null block, a fixed block-table
    width), run eagerly on CPU ranks: same tokens and logprobs as unpadded decode."""
    runs = sizing[f"padded_{plan}"]
    plain, padded = runs["false"], runs["true"]
    assert plain["steps"] == 0 and padded["steps"] >= 12  # every decode step went padded
    assert runs["eager_steps"] == 0  # enforce_eager: none
    assert padded["tokens"] == plain["tokens"]
    for a, b in zip(padded["logprobs"], plain["logprobs"]):
        assert a == pytest.approx(b, abs=1e-5)


def test_capture_sizes_buckets_and_padding():
    from seesaw_mcore.runtime.cuda_graphs import bucket, capture_sizes, pad_decode

    assert capture_sizes(256)[:6] == [1, 2, 4, 8, 16, 24] and capture_sizes(256)[-1] == 256
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20] and capture_sizes(1) == [1]
    assert capture_sizes(2000)[-1] == 512
    sizes = capture_sizes(20)
    assert [bucket(n, sizes) for n in (1, 3, 5, 9, 17, 20, 21)] == [1, 4, 8, 16, 20, 20, None]
    q, c, t = pad_decode([1, 1], [9, 4], [[3, 5, 7], [2]], 4, null_block=99)
    assert q == [1, 1, 1, 1] and c == [9, 4, 1, 1] and t == [[3, 5, 7], [2], [99], [99]]
    with pytest.raises(ValueError):
        pad_decode([1] * 5, [1] * 5, [[0]] * 5, 4, 0)


def test_graphs_choose_decode_splits_from_the_real_context():
    """A graph is captured per context class, so split-context decode follows the step's
    longest context (within 2x), not the block table's full width."""
    from seesaw_mcore.model.triton_attention import decode_splits
    from seesaw_mcore.runtime.cuda_graphs import context_class

    width = 32768  # tokens the padded block table covers (max_model_len)
    assert [context_class(c, width) for c in (1, 100, 512, 513, 3000, 40000)] == [
        512, 512, 512, 1024, 4096, 32768]
    short, long_ = context_class(300, width), context_class(5000, width)
    assert decode_splits(8, 1, short, sms=132) == 1  # short contexts: no split
    assert decode_splits(8, 1, long_, sms=132) == 16
    assert decode_splits(8, 1, width, sms=132) == 16  # what the width alone chose before


class _FakeCuda:
    """Enough of DeepSpeed's CUDA accelerator for ``CopyQueue``."""

    def __init__(self) -> None:
        self.set_on: list[tuple[str, int]] = []

    def device_name(self, *_):
        return "cuda"

    def current_device(self):
        return 3

    def set_device(self, index):
        self.set_on.append((threading.current_thread().name, index))

    def Stream(self):  # noqa: N802 - DeepSpeed's name
        return _Nothing()

    def Event(self):  # noqa: N802
        return _Nothing()

    def stream(self, _s):
        return _Nothing()


class _Nothing:
    def __getattr__(self, _name):
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_copy_thread_sets_the_ranks_device_once():
    acc = _FakeCuda()
    t = CopyQueue(acc, async_=True)
    ran = []
    for _ in range(3):
        t.submit(lambda: ran.append(threading.current_thread().name))
    t.close()
    assert len(ran) == 3 and acc.set_on == [(ran[0], 3)] and ran[0].startswith("seesaw-kv")
