"""Benchmark: new weights in place (``LLM.update_weights``, sleep / wake_up) against building
a new engine on the new checkpoint, per plan (run under the launcher, one world per run).

    python -m seesaw_mcore.bench.weights --plans T1
    deepspeed --no_local_rank --num_gpus 2 --module seesaw_mcore.bench.weights \
        --plans T2 P2:T2

Per plan, on the bench model: the time to build an engine on checkpoint B (what an RL loop
without in-place updates pays every round: read and shard the checkpoint, pin both Seesaw
shards, build the stages, size and allocate the KV cache) against ``update_weights`` with
B's full tensors handed over in memory (a trainer's gathered tensors) on an engine built on
A; the updated engine's greedy tokens are checked against the new engine's. Also timed:
``sleep(1)`` + ``wake_up()``, and ``sleep(2)`` + ``wake_up()`` + the update that must follow.
Each time is the best of ``--repeats``, every rank's slowest.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from seesaw_mcore.bench.common import bench_parser, bench_setup, emit, gather, machine


def _checkpoint_b(path: str) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    """Checkpoint A's tensors, each perturbed (a training step's worth), saved as
    checkpoint B by rank 0; every rank gets B's tensors in memory."""
    from safetensors.torch import load_file, save_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            tensors.update(load_file(os.path.join(path, f)))
    gen = torch.Generator().manual_seed(0)
    new = {n: t + 0.01 * t.std() * torch.randn(t.shape, generator=gen, dtype=t.dtype)
           for n, t in sorted(tensors.items())}
    box = [None]
    if dist.get_rank() == 0:
        box[0] = os.path.join(tempfile.mkdtemp(), "bench-llama-b")
        os.makedirs(box[0])
        shutil.copy(os.path.join(path, "config.json"), box[0])
        save_file(new, os.path.join(box[0], "model.safetensors"))
    dist.broadcast_object_list(box, src=0)
    return box[0], list(new.items())


def _timed(fn) -> float:
    """Seconds ``fn`` takes on the slowest rank (ranks start together)."""
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    dist.barrier()
    return max(gather(time.perf_counter() - t0))


def main(argv: list[str] | None = None) -> int:
    ap = bench_parser(__doc__)
    ap.add_argument("--plans", nargs="+", default=["T1"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=16)
    args = ap.parse_args(argv)
    from seesaw_mcore import LLM, SamplingParams

    rank, world, path, prompts = bench_setup(args)
    path_b, weights_b = _checkpoint_b(path)
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    reqs = [{"prompt_token_ids": p} for p in prompts[:8]]
    common = dict(kv_cache_gib=1.0, max_prefill_tokens=2048)
    rows = []
    for plan in args.plans:
        kw = dict(common, **({"host_kv_tokens": 4096} if ":" in plan else {}))
        build_s, fresh = [], None
        for _ in range(args.repeats):
            if fresh is not None:
                fresh.close()
            box: list = []
            build_s.append(_timed(lambda plan=plan, kw=kw, box=box: box.append(
                LLM(path_b, plan=plan, **kw))))
            fresh = box[0]
        want = [o.outputs[0].token_ids for o in fresh.generate(reqs, greedy, use_tqdm=False)]
        fresh.close()
        llm = LLM(path, plan=plan, **kw)
        llm.generate(reqs[:2], greedy, use_tqdm=False)  # warm: both layouts used
        update_s = [_timed(lambda llm=llm: llm.update_weights(weights_b))
                    for _ in range(args.repeats)]
        got = [o.outputs[0].token_ids for o in llm.generate(reqs, greedy, use_tqdm=False)]
        sleep1_s, sleep2_s = [], []
        for _ in range(args.repeats):
            sleep1_s.append(_timed(lambda llm=llm: (llm.sleep(1), llm.wake_up())))
            sleep2_s.append(_timed(lambda llm=llm: (llm.sleep(2), llm.wake_up(),
                                                     llm.update_weights(weights_b))))
        again = [o.outputs[0].token_ids for o in llm.generate(reqs, greedy, use_tqdm=False)]
        llm.close()
        rows.append({"plan": plan, "new_engine_s": round(min(build_s), 3),
                     "update_weights_s": round(min(update_s), 3),
                     "new_engine_over_update": round(min(build_s) / min(update_s), 1),
                     "sleep1_wake_s": round(min(sleep1_s), 3),
                     "sleep2_wake_update_s": round(min(sleep2_s), 3),
                     "same_tokens_as_new_engine": got == want and again == want})
    if rank == 0:
        from seesaw_mcore.config import ModelConfig

        cfg = ModelConfig.from_pretrained(path)
        params = sum(t.numel() for _, t in weights_b)
        emit({"machine": machine(f"{world} CPU ranks x 1 thread"), "world": world,
              "model": f"{path} ({params / 1e6:.1f}M parameters, {cfg.num_layers} layers)",
              "rows": rows}, args.json)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(os.path.dirname(path_b), ignore_errors=True)
    return 0 if all(r["same_tokens_as_new_engine"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
