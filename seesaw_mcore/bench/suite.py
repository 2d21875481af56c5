"""Benchmark suite: every static plan of the world size, Seesaw plans, ``plan=auto`` and HF
``transformers`` ``generate`` on identical seeded requests, in one run (Hydra, ``conf/bench.yaml``;
under the launcher).

    deepspeed --no_local_rank --num_gpus 2 --module seesaw_mcore.bench model.size=medium

Writes ``results.json``, ``throughput.png`` (per plan per workload, best static marked),
``timeline.png`` (one Seesaw run: phase, tier load and batch size over time) and
``sweep.png`` (throughput vs output:input ratio) to ``output_dir``, and prints each plan's
ratio to the best static plan. Runs are interleaved (round -> workload -> plan) so drift hits
every plan alike; each plan's best round is reported.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from seesaw_mcore.bench.plots import plot
from seesaw_mcore.errors import SeesawError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZES = {  # random-weight models: (layers, hidden, heads, kv heads, MLP, vocab)
    "small": dict(num_layers=6, hidden=512, heads=8, kv_heads=4, intermediate=1408, vocab=8000),
    "medium": dict(num_layers=12, hidden=768, heads=12, kv_heads=4, intermediate=2048,
                   vocab=32000),
    "large": dict(num_layers=24, hidden=1024, heads=16, kv_heads=8, intermediate=2816,
                  vocab=32000),
    # a random Mixtral: every layer 8 experts of MLP 704, top 2 (~80M parameters, ~25M active)
    "moe": dict(arch="mixtral", num_layers=6, hidden=512, heads=8, kv_heads=4,
                intermediate=704, vocab=8000, experts=8),
}
# Mean prompt / output tokens are the planner's (``planner.WORKLOADS``, with sources); the
# lengths drawn around them spread by this fraction.
SPREAD = {"sharegpt": 0.8, "arxiv": 0.15}


@dataclass(frozen=True)
class Request:
    prompt: list[int]
    max_tokens: int


def _model(cfg: DictConfig) -> str:
    """The model folder: ``model.path``, the bundled tiny one, or a random Llama built once
    (rank 0) under ``output_dir/models``."""
    if cfg.model.path:
        return str(cfg.model.path)
    if cfg.model.size == "tiny":
        return os.path.join(REPO, "models", "tiny-llama")
    if cfg.model.size not in SIZES:
        raise SeesawError(f"model.size must be one of tiny, {', '.join(SIZES)}, got "
                          f"{cfg.model.size!r}")
    path = os.path.abspath(os.path.join(cfg.output_dir, "models", f"llama-{cfg.model.size}"))
    box: list = [None]
    if dist.get_rank() == 0 and not os.path.isfile(os.path.join(path, "config.json")):
        from seesaw_mcore.bench.models import build_random

        build_random(path, init_std=0.02, max_positions=4096, **SIZES[cfg.model.size])
    dist.broadcast_object_list(box, src=0)
    return path


def draw_requests(name: str, n: int, scale: float, vocab: int, max_len: int, seed: int
                  ) -> list[Request]:
    """``n`` seeded requests shaped like a preset: log-normal lengths around its means
    (times ``scale``); a prompt is truncated so that prompt + output fits ``max_len``."""
    from seesaw_mcore.planner import WORKLOADS

    mean_p, mean_o, sigma = WORKLOADS[name].prompt_len, WORKLOADS[name].output_len, SPREAD[name]
    rng = random.Random(f"{name}-{seed}")

    def draw(mean: float) -> int:  # log-normal with this mean
        return max(int(rng.lognormvariate(math.log(mean * scale) - sigma**2 / 2, sigma)), 1)

    out = []
    for _ in range(n):
        o = min(draw(mean_o), max_len // 2)
        p = min(max(draw(mean_p), 4), max_len - o)
        out.append(Request([rng.randrange(3, vocab) for _ in range(p)], o))
    return out


def mean_lengths(reqs: list[Request]) -> str:
    """``"PROMPT:OUTPUT"``: the requests' mean lengths, as ``plan=auto``'s ``workload``."""
    n = len(reqs)
    return (f"{sum(len(r.prompt) for r in reqs) / n:.0f}:"
            f"{sum(r.max_tokens for r in reqs) / n:.0f}")


def sweep_workload(input_len: int, ratio: float, n: int, vocab: int, seed: int
                   ) -> list[Request]:
    """Fixed-length requests: ``input_len`` prompt tokens, ``ratio x input_len`` outputs."""
    rng = random.Random(f"sweep-{seed}")
    out = max(int(round(ratio * input_len)), 1)
    return [Request([rng.randrange(3, vocab) for _ in range(input_len)], out) for _ in range(n)]


class PeakRSS:
    """Samples this process's RSS every 10 ms between ``start`` and ``stop``."""

    def __init__(self) -> None:
        import psutil

        self._proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(0.01)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def run_engine(path: str, prefill: str, decode: str | None, reqs: list[Request],
               trace: bool = False, warmup: bool = True, **llm_kw) -> dict:
    """One plan on ``reqs`` (fresh engine built with ``llm_kw``, warmed up unless
    ``warmup=False``; ``prefill="auto"``: ``plan=auto``); metrics on rank 0, ``{}``
    elsewhere."""
    from seesaw_mcore import LLM, SamplingParams
    from seesaw_mcore.bench.common import gather

    llm = LLM(path, prefill=prefill, decode=decode, **llm_kw)
    prompts = [{"prompt_token_ids": r.prompt} for r in reqs]
    params = [SamplingParams(temperature=0, max_tokens=r.max_tokens, ignore_eos=True)
              for r in reqs]
    if warmup:
        llm.generate(prompts[:2], params[:2], use_tqdm=False)
    eng = llm.engine
    st = eng.stats
    before = asdict(st)
    busy0, wait0 = st.swap.busy_s, st.swap.wait_s
    eng.trace = [] if trace else None
    dist.barrier()
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dist.barrier()
        wall = time.perf_counter() - t0
    after = asdict(st)
    peaks = gather(rss.peak)
    events = [asdict(e) for e in eng.trace] if eng.trace is not None else None
    plan, trial = llm.plan.to_string(), llm.trial.summary() if llm.trial is not None else None
    llm.close()
    if dist.get_rank() != 0:
        return {}
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    prompt = sum(len(r.prompt) for r in reqs)
    res = {
        "wall_s": wall, "requests_per_s": len(reqs) / wall, "output_tokens_per_s": gen / wall,
        "total_tokens_per_s": (prompt + gen) / wall,
        **{k: after[k] - before[k] for k in ("prefill_s", "decode_s", "switch_s", "switches",
                                             "preemptions", "prefill_tokens", "cached_tokens",
                                             "tier_shared_tokens")},
        "tier_copy_s": st.swap.busy_s - busy0, "tier_wait_s": st.swap.wait_s - wait0,
        "peak_rss_mb": [round(p / 2**20, 1) for p in peaks], "engine_plan": plan,
    }
    if trial is not None:
        res["trial"] = trial
    if events is not None:
        res["timeline"] = events
    return res


def run_hf(path: str, reqs: list[Request], batch: int = 16) -> dict:
    """HF ``generate`` on rank 0 (one rank; the others wait): greedy, batches of requests
    sorted by output length (left-padded), each batch to its longest output; only requested
    tokens are counted."""
    res: dict = {}
    if dist.get_rank() == 0:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     use_safetensors=True).eval()
        order = sorted(reqs, key=lambda r: r.max_tokens)

        def generate(rs: list[Request]) -> None:
            for i in range(0, len(rs), batch):
                chunk = rs[i:i + batch]
                width = max(len(r.prompt) for r in chunk)
                ids = torch.tensor([[0] * (width - len(r.prompt)) + r.prompt for r in chunk])
                mask = (torch.arange(width)[None] >= torch.tensor(
                    [width - len(r.prompt) for r in chunk])[:, None]).long()
                n = max(r.max_tokens for r in chunk)
                with torch.no_grad():
                    model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                                   min_new_tokens=n, eos_token_id=None, pad_token_id=0)

        generate(order[:2])  # warm-up
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            generate(order)
            wall = time.perf_counter() - t0
        gen = sum(r.max_tokens for r in reqs)
        prompt = sum(len(r.prompt) for r in reqs)
        res = {"wall_s": wall, "requests_per_s": len(reqs) / wall,
               "output_tokens_per_s": gen / wall, "total_tokens_per_s": (prompt + gen) / wall,
               "peak_rss_mb": [round(rss.peak / 2**20, 1)]}
    dist.barrier()
    return res


def _plans(cfg: DictConfig, path: str, world: int) -> list[tuple[str, str, str]]:
    """``(label, prefill, decode)`` of every plan to run, static ones first."""
    from seesaw_mcore.config import ModelConfig, PhasePlan
    from seesaw_mcore.planner import layouts

    model = ModelConfig.from_pretrained(path)
    static = ([str(lay) for lay in layouts(world, model.num_experts)]
              if cfg.plans.static == "all"
              else list(cfg.plans.static))
    out = []
    for name in static:
        plan = PhasePlan.parse(name)
        if plan.prefill.world_size == world and _valid(model, plan):
            out.append((str(plan), str(plan.prefill), str(plan.prefill)))
    for pair in cfg.plans.seesaw or []:
        p, _, d = str(pair).partition(":")
        plan = PhasePlan.parse(p, d)
        if plan.prefill.world_size == world and _valid(model, plan):
            out.append((str(plan), p, d))
    if cfg.plans.auto:
        out.append(("auto", "auto", "auto"))
    return out


def _valid(model, plan) -> bool:
    try:
        model.check_plan(plan)
        return True
    except SeesawError:
        return False


def summarize(runs: list[dict]) -> dict:
    """Per workload: each plan's best round, the best static plan, ratios to it."""
    out: dict = {}
    for r in runs:
        wl = out.setdefault(r["workload"], {"plans": {}})
        best = wl["plans"].get(r["plan"])
        if best is None or r["total_tokens_per_s"] > best["total_tokens_per_s"]:
            wl["plans"][r["plan"]] = r
    for wl in out.values():
        static = {k: v for k, v in wl["plans"].items() if v["kind"] == "static"}
        name = max(static, key=lambda k: static[k]["total_tokens_per_s"])
        wl["best_static"] = name
        base = static[name]["total_tokens_per_s"]
        wl["ratio_to_best_static"] = {k: round(v["total_tokens_per_s"] / base, 3)
                                      for k, v in wl["plans"].items()}
        wl["plans"] = {k: {kk: vv for kk, vv in v.items() if kk != "timeline"}
                       for k, v in wl["plans"].items()}
    return out


def table(summary: dict) -> str:
    """Each plan's throughput and its ratio to the best static plan, per workload."""
    lines = []
    for wl, data in summary.items():
        lines.append(f"== {wl}: best static {data['best_static']} ==")
        lines.append(f"{'plan':>20} {'tok/s':>10} {'req/s':>8} {'vs best static':>15} "
                     f"{'switches':>9}")
        for name, r in data["plans"].items():
            lines.append(f"{name:>20} {r['total_tokens_per_s']:10.1f} {r['requests_per_s']:8.2f} "
                         f"{data['ratio_to_best_static'][name]:14.3f}x "
                         f"{r.get('switches', 0):9d}")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict | None:
    from seesaw_mcore.bench.common import machine
    from seesaw_mcore.planner import ModelShape
    from seesaw_mcore.runtime import groups

    torch.set_num_threads(1)
    rank, world = groups.init_distributed()
    if rank == 0:
        os.makedirs(cfg.output_dir, exist_ok=True)
    path = _model(cfg)
    raw = json.load(open(os.path.join(path, "config.json")))
    vocab, max_len = raw["vocab_size"], raw.get("max_position_embeddings", 2048)
    plans = _plans(cfg, path, world)
    if not any(label == p == d for label, p, d in plans):
        raise SeesawError(f"no static plan of {world} ranks is valid for this model; "
                          f"check plans.static")
    def engine_kw(prefill: str, decode: str) -> dict:
        kw = dict(kv_cache_gib=cfg.kv_cache_gib, max_prefill_tokens=cfg.max_prefill_tokens)
        if prefill != decode and cfg.host_kv_tokens is not None:
            kw["host_kv_tokens"] = int(cfg.host_kv_tokens)
        return kw

    loads = {name: draw_requests(name, cfg.num_requests, cfg.length_scale, vocab, max_len, cfg.seed)
             for name in cfg.workloads}
    runs, timeline = [], None
    seesaw = next((label for label, p, d in plans if p != d), None)
    for rnd in range(cfg.rounds):
        for wl, reqs in loads.items():
            for label, p, d in plans:
                want = label == seesaw and timeline is None and rnd == cfg.rounds - 1
                kw = engine_kw(p, d)
                if p == "auto":  # the requests' mean lengths; its trial is part of the run
                    kw.update(workload=mean_lengths(reqs), warmup=False)
                res = run_engine(path, p, d, reqs, trace=want, **kw)
                if rank == 0:
                    if want:
                        timeline = {"plan": label, "workload": wl,
                                    "events": res.pop("timeline")}
                    kind = ("auto" if label.startswith("auto") else
                            "static" if p == d else "seesaw")
                    runs.append({"workload": wl, "plan": label, "round": rnd, "kind": kind,
                                 "prefill": p, "decode": d, **res})
            if cfg.hf:
                res = run_hf(path, reqs)
                if rank == 0:
                    runs.append({"workload": wl, "plan": "HF generate", "round": rnd,
                                 "kind": "hf", **res})
    sweep = None
    if cfg.sweep.enabled:
        sweep = {"input_len": cfg.sweep.input_len, "runs": []}
        for ratio in cfg.sweep.ratios:
            reqs = sweep_workload(min(cfg.sweep.input_len, max_len // 2), ratio,
                                  cfg.sweep.num_requests, vocab, cfg.seed)
            for label, p, d in plans:
                if label.startswith("auto"):
                    continue
                res = run_engine(path, p, d, reqs, **engine_kw(p, d))
                if rank == 0:
                    sweep["runs"].append({"ratio": ratio, "plan": label, **res})
    if rank != 0:
        return None
    results = {
        "machine": machine(f"{world} {groups.device().type} ranks x "
                           f"{torch.get_num_threads()} thread"),
        "config": OmegaConf.to_container(cfg, resolve=True), "model": path,
        "model_params": ModelShape.from_config(path).params, "world_size": world,
        "plans": [{"label": lb, "prefill": p, "decode": d} for lb, p, d in plans],
        "runs": runs, "summary": summarize(runs), "timeline": timeline, "sweep": sweep,
    }
    results["plots"] = [os.path.basename(p) for p in plot(results, cfg.output_dir)]
    with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    print(table(results["summary"]))
    print(f"results: {os.path.join(cfg.output_dir, 'results.json')}")
    return results


@hydra.main(version_base="1.3", config_path=os.path.join(REPO, "conf"), config_name="bench")
def main(cfg: DictConfig) -> None:
    from seesaw_mcore.runtime import groups

    code = 0
    try:
        run(cfg)
    except SeesawError as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        code = 1
    groups.shutdown()
    sys.exit(code)


if __name__ == "__main__":
    main()
