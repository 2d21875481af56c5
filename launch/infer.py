"""Offline batch generation: JSONL prompts in, JSONL completions out.

    deepspeed --no_local_rank --num_gpus 2 launch/infer.py plan=P2:T2 \
        data.input=prompts.jsonl data.output=out.jsonl sampling.temperature=0

Also runs under torchrun, or as plain ``python launch/infer.py`` for one rank. With no
overrides it runs the bundled tiny model on the bundled sample prompts (``make demo``).

The configuration is ``InferConfig``: the engine's ``EngineConfig`` (registered in Hydra's
ConfigStore, so overrides are type-checked) plus the ``sampling`` and ``data`` groups.
"""

from __future__ import annotations

import itertools
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

MAX_ERROR_LINES = 20  # bad records printed; the rest are counted
FORMATS = ("prompts", "openai_batch")  # data.format

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from seesaw_mcore.config import EngineConfig  # noqa: E402
from seesaw_mcore.config.sections import resolve_model_paths, resolve_path  # noqa: E402
from seesaw_mcore.errors import Interrupted, SeesawError, exit_status  # noqa: E402
from seesaw_mcore.runtime import groups  # noqa: E402


@dataclass
class DataConfig:
    """Where prompts come from and completions go (``conf/data/``)."""

    input: str = "data/sample_prompts.jsonl"  # JSONL, JSON, Parquet, CSV or a datasets folder
    # "prompts" (records with a prompt or messages) or "openai_batch" (OpenAI Batch API
    # lines in, its output lines out; each body carries its own sampling parameters)
    format: str = "prompts"
    output: str = "outputs/out.jsonl"  # JSONL, one record per prompt, written as each finishes
    overwrite: bool = False  # false: a rerun keeps finished records, runs only the other ids
    fsync_every_s: float = 5.0  # finished records are forced to disk at least this often
    prompt_field: str = "prompt"  # the text prompt's field
    messages_field: str = "messages"  # the chat messages' field (rendered with the template)
    id_field: str = "id"  # the id's field (absent: line-N / row-N)
    system_prompt: str | None = None  # prepended as a system message to chat records
    prompt_template: str | None = None  # e.g. "Question: {prompt}\nAnswer:" for text prompts


@dataclass
class InferConfig(EngineConfig):
    """The job: the engine's configuration, sampling (``SamplingParams`` fields; validated
    by it), the data, and whether rank 0 shows a progress bar."""

    sampling: Any = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    progress: bool = True

    def __post_init__(self) -> None:  # checked by EngineConfig.from_mapping, once merged
        pass


ConfigStore.instance().store(name="infer_schema", node=InferConfig)


def run(cfg: DictConfig) -> int:
    """The job; returns the exit status."""
    from seesaw_mcore import quiet

    quiet.configure(bool(cfg.runtime.verbose))  # before megatron-core is imported
    import torch.distributed as dist

    from seesaw_mcore import LLM, SamplingParams
    from seesaw_mcore.io import InputSpec, OutputWriter, PromptReader

    raw = OmegaConf.to_container(cfg, resolve=True)
    resolve_model_paths(raw["model"], REPO)
    engine_cfg = EngineConfig.from_mapping(raw)
    sampling = SamplingParams(**raw["sampling"])
    fmt = cfg.data.get("format", "prompts")
    if fmt not in FORMATS:
        raise SeesawError(f"data.format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    llm = LLM(config=engine_cfg)
    reader, writer, failure = None, None, None
    if llm.is_driver:  # input and output problems end every rank, not only rank 0
        try:
            writer = OutputWriter(cfg.data.output, overwrite=cfg.data.get("overwrite", False),
                                  fsync_every_s=cfg.data.get("fsync_every_s", 5.0),
                                  key="custom_id" if fmt == "openai_batch" else "id")
            if fmt == "openai_batch":
                from seesaw_mcore.serving.batch import OpenAIBatch

                name = os.path.basename(os.path.normpath(engine_cfg.model.path))
                reader = OpenAIBatch(resolve_path(cfg.data.input, REPO), llm.tokenizer, name,
                                     skip=writer.done)
            else:
                spec = InputSpec(**{k: cfg.data[k] for k in (
                    "prompt_field", "messages_field", "id_field", "system_prompt",
                    "prompt_template") if k in cfg.data})
                reader = PromptReader(resolve_path(cfg.data.input, REPO), llm.tokenizer, spec,
                                      skip=writer.done)
        except SeesawError as e:
            failure = str(e)
    wd = groups.watchdog()
    wd.install_signal_handlers()  # SIGTERM / Ctrl-C: stop between steps, keep what finished
    if writer is not None:
        wd.on_exit(writer.close)
    box = [failure]
    dist.broadcast_object_list(box, src=0)  # every rank learns whether to go on
    if box[0] is not None:
        if writer:
            writer.close()
        raise SeesawError(box[0])
    if writer is not None and (writer.done or writer.dropped_bytes):
        torn = (f"; dropped a torn last line ({writer.dropped_bytes} bytes)"
                if writer.dropped_bytes else "")
        print(f"resuming {cfg.data.output}: {len(writer.done)} ids already done{torn}; "
              "running the rest")
    totals = _Totals()
    rejected: list[str] = []

    def on_output(out) -> None:
        if fmt == "openai_batch":
            record = reader.finished(out)
            if record is not None:
                writer.write_row(record)
        else:
            writer.write(out)
        totals.add(out)

    # (id, prompt, params) per request, streamed from the reader
    if reader is None:
        requests = iter(())
    elif fmt == "openai_batch":
        requests = reader.requests()
    else:
        adapters = Adapters(engine_cfg.lora, reader.errors)
        requests = ((r.id, r.prompt, sampling, adapters.of(r)) for r in reader
                    if adapters.allowed(r))
    start = time.perf_counter()
    try:
        # tee keeps prompts, params, ids and adapters in step, buffering one
        reqs = itertools.tee(requests, 4)
        llm.generate(
            (r[1] for r in reqs[0]), (r[2] for r in reqs[1]),
            use_tqdm=cfg.progress and llm.is_driver,
            request_ids=(r[0] for r in reqs[2]), on_output=on_output if writer else None,
            on_reject=lambda rid, msg: rejected.append(f"id {rid!r}: {msg}"),
            keep_outputs=False,
            lora_request=(r[3] if len(r) > 3 else None for r in reqs[3])
            if engine_cfg.lora.enable_lora else None,
        )
    except Interrupted as e:
        # named by the watchdog's request now: a Ctrl-C's SIGINT may follow its relayed SIGTERM
        stop = Interrupted(wd.stop_signal or e.signum)
        if writer:
            stop.args = (f"{stop}: stopped admitting prompts; {writer.written} records finished "
                         f"in this run are in {cfg.data.output}; rerun the same command to "
                         "resume",)
        raise stop from None
    finally:
        if writer:
            writer.close()
    bad = []
    peaks = [None] * dist.get_world_size()  # every rank's peak RSS, for the report
    dist.all_gather_object(peaks, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    if llm.is_driver:
        _report(llm, totals, time.perf_counter() - start, cfg)
        print("  peak RSS per rank: " + ", ".join(f"{p / 2**20:.0f} MB" for p in peaks))
        if reader.num_skipped:
            print(f"  resumed: {reader.num_skipped} of {reader.num_records} ids were done "
                  "before this run")
        bad = reader.errors + [f"{reader.path}: {m}" for m in rejected]
        for msg in bad[:MAX_ERROR_LINES]:
            print(f"error: {msg}", file=sys.stderr)
        if len(bad) > MAX_ERROR_LINES:
            print(f"error: ... and {len(bad) - MAX_ERROR_LINES} more bad records",
                  file=sys.stderr)
    llm.shutdown()
    return 1 if bad else 0


class Adapters:
    """Each record's LoRA adapter: its own ``lora_path`` field, else ``lora.path`` (one
    ``LoRARequest`` per folder, named by ``lora.name`` or the folder's name)."""

    def __init__(self, lora, errors: list[str]) -> None:
        self.lora, self.known, self.errors = lora, {}, errors

    def allowed(self, record) -> bool:
        """False (an error line) for a record naming an adapter when LoRA is off."""
        if record.lora_path and not self.lora.enable_lora:
            self.errors.append(f"id {record.id!r}: lora_path needs lora.enable_lora=true")
            return False
        return True

    def of(self, record):
        from seesaw_mcore import LoRARequest

        path = record.lora_path or self.lora.path
        if path is None:
            return None
        if path not in self.known:
            name = (self.lora.name if path == self.lora.path and self.lora.name
                    else os.path.basename(os.path.normpath(path)))
            self.known[path] = LoRARequest(name, len(self.known) + 1, path)
        return self.known[path]


@dataclass
class _Totals:
    """What the run report counts, kept as outputs stream past."""

    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0

    def add(self, out) -> None:
        self.requests += 1
        self.prompt_tokens += len(out.prompt_token_ids)
        self.generated_tokens += sum(len(o.token_ids) for o in out.outputs)


def _report(llm, totals: _Totals, elapsed: float, cfg: DictConfig) -> None:
    st = llm.engine.stats
    print(f"\n== seesaw_mcore run report ({llm.engine.plan}, {totals.requests} requests, "
          f"output {cfg.data.output}) ==")
    print(f"  wall {elapsed:.2f}s | {totals.requests / elapsed:.2f} req/s | prompt "
          f"{totals.prompt_tokens / elapsed:.1f} tok/s | generated "
          f"{totals.generated_tokens / elapsed:.1f} tok/s")
    print(f"  prefill {st.prefill_s:.2f}s ({st.prefill_steps} steps) | decode {st.decode_s:.2f}s "
          f"({st.decode_steps} steps) | preemptions {st.preemptions} "
          f"({st.swap_preemptions} swapped)"
          + (f" | handed back to a tier for prefill {st.handed_back}" if st.handed_back else ""))
    if llm.engine.config.cache.enable_prefix_caching:
        print(f"  prefix cache: hit rate {st.prefix_hit_rate:.1%} | prefill tokens computed "
              f"{st.computed_tokens} of {st.prefill_tokens} given"
              + (f" | {st.tier_shared_tokens} KV tokens shared in the tiers"
                 if st.tier_shared_tokens else ""))
    if not llm.engine.plan.is_static:
        sw = st.swap
        print(f"  switches {st.switches} ({st.switch_s * 1e3:.1f} ms) | tier copies (rank 0) "
              f"{sw.busy_s:.2f}s, {sw.overlap:.0%} hidden behind compute")
        for name, t in sw.tiers.items():
            if t.out_bytes or t.in_bytes:
                print(f"  {name} tier (rank 0): out {t.out_bytes / 1e6:.1f} MB in "
                      f"{t.out_s:.2f}s, in {t.in_bytes / 1e6:.1f} MB in {t.in_s:.2f}s")


@hydra.main(version_base="1.3", config_path="../conf", config_name="infer")
def main(cfg: DictConfig) -> None:
    sys.exit(exit_status(lambda: run(cfg)))


if __name__ == "__main__":
    main()
