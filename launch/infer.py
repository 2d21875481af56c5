"""Offline batch generation: JSONL prompts in, JSONL completions out.

    deepspeed --no_local_rank --num_gpus 2 launch/infer.py plan=t2 \
        data.input=prompts.jsonl data.output=out.jsonl sampling.temperature=0

Also runs under torchrun, or as plain ``python launch/infer.py`` for one rank. With no
overrides it runs the bundled tiny model on the bundled sample prompts (``make demo``).
"""

from __future__ import annotations

import os
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from seesaw_mcore.errors import SeesawError  # noqa: E402


def _resolve(path: str) -> str:
    """Relative paths: against the working directory, else against the repo (bundled files)."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    in_repo = os.path.join(REPO, path)
    return in_repo if os.path.exists(in_repo) else path


def run(cfg: DictConfig) -> int:
    """The job; returns the exit status."""
    import torch.distributed as dist

    from seesaw_mcore import LLM, SamplingParams
    from seesaw_mcore.io import InputSpec, OutputWriter, read_prompts

    sampling = SamplingParams(**OmegaConf.to_container(cfg.sampling, resolve=True))
    llm = LLM(
        _resolve(cfg.model.path), prefill=str(cfg.plan.prefill),
        decode=None if cfg.plan.decode is None else str(cfg.plan.decode), dtype=cfg.dtype,
        seed=cfg.seed, block_size=cfg.cache.block_size, num_blocks=cfg.cache.num_blocks,
        kv_cache_gib=cfg.cache.kv_cache_gib, host_kv_tokens=cfg.cache.host_kv_tokens,
        host_kv_gib=cfg.cache.host_kv_gib, prefetch_watermark=cfg.cache.prefetch_watermark,
        disk_path=cfg.cache.disk_path, disk_kv_tokens=cfg.cache.disk_kv_tokens,
        disk_kv_gib=cfg.cache.disk_kv_gib, async_swap=cfg.cache.async_swap,
        max_num_seqs=cfg.scheduler.max_num_seqs,
        max_prefill_tokens=cfg.scheduler.max_prefill_tokens,
        prefill_micro_batches=cfg.scheduler.prefill_micro_batches,
        policy=cfg.scheduler.policy, refill_threshold=cfg.scheduler.refill_threshold,
        max_model_len=cfg.model.max_model_len, workload=cfg.plan.get("workload", "sharegpt"),
    )
    records, bad, failure, writer = [], [], None, None
    if llm.is_driver:  # input and output problems end every rank, not only rank 0
        try:
            spec = InputSpec(**{k: cfg.data[k] for k in (
                "prompt_field", "messages_field", "id_field", "system_prompt",
                "prompt_template") if k in cfg.data})
            records, bad = read_prompts(_resolve(cfg.data.input), llm.tokenizer, spec)
            writer = OutputWriter(cfg.data.output, overwrite=cfg.data.get("overwrite", False),
                                  fsync_every_s=cfg.data.get("fsync_every_s", 5.0))
        except SeesawError as e:
            failure = str(e)
    box = [failure]
    dist.broadcast_object_list(box, src=0)  # every rank learns whether to go on
    if box[0] is not None:
        raise SeesawError(box[0])
    if writer is not None and (writer.done or writer.dropped_bytes):
        todo = [r for r in records if r.id not in writer.done]
        torn = (f"; dropped a torn last line ({writer.dropped_bytes} bytes)"
                if writer.dropped_bytes else "")
        print(f"resuming {cfg.data.output}: {len(records) - len(todo)} of {len(records)} "
              f"ids already done{torn}; running {len(todo)}")
        records = todo
    by_id = {r.id: r for r in records}
    start = time.perf_counter()
    try:
        outs = llm.generate(
            [r.prompt for r in records], sampling, use_tqdm=cfg.progress and llm.is_driver,
            request_ids=[r.id for r in records],
            on_output=(lambda o: writer.write(by_id[o.request_id], o)) if writer else None,
        )
    finally:
        if writer:
            writer.close()
    if llm.is_driver:
        _report(llm, outs, time.perf_counter() - start, cfg)
        for msg in bad:
            print(f"error: {msg}", file=sys.stderr)
    llm.shutdown()
    return 1 if bad else 0


def _report(llm, outs, elapsed: float, cfg: DictConfig) -> None:
    st = llm.engine.stats
    gen = sum(len(o.token_ids) for r in outs for o in r.outputs)
    prompt = sum(len(r.prompt_token_ids) for r in outs)
    print(f"\n== seesaw_mcore run report ({llm.engine.plan}, {len(outs)} requests, "
          f"output {cfg.data.output}) ==")
    print(f"  wall {elapsed:.2f}s | {len(outs) / elapsed:.2f} req/s | prompt {prompt / elapsed:.1f}"
          f" tok/s | generated {gen / elapsed:.1f} tok/s")
    print(f"  prefill {st.prefill_s:.2f}s ({st.prefill_steps} steps) | decode {st.decode_s:.2f}s "
          f"({st.decode_steps} steps) | preemptions {st.preemptions} "
          f"({st.swap_preemptions} swapped)"
          + (f" | handed back to a tier for prefill {st.handed_back}" if st.handed_back else ""))
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
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        code = run(cfg)
    except SeesawError as e:  # raised identically on every rank: rank 0 reports it
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {e}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
