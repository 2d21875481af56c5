"""AsyncLLM taking weights from a trainer process while it serves, run by
test_async_llm.py under the launcher, per plan: a request is kept paused, every rank joins
``trainer_stub.py``'s update group and receives checkpoint B through the engine's control
messages, the request finishes, and a new request runs on B. Arguments: the models
``A=path,B=path``, the output file, then plans. Rank 0 writes JSON."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

from seesaw_mcore import AsyncLLM, SamplingParams
from tests.distributed.async_job import PROMPTS, collect, engine_kwargs
from tests.distributed.training_loop_job import tensors


async def drive(llm, b_path: str, log: str) -> dict:
    import torch.distributed as dist

    from tests.conftest import free_test_port

    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    kept = asyncio.create_task(collect(llm, PROMPTS[3], sp, "kept"))
    while llm.num_requests == 0:
        await asyncio.sleep(0.005)
    await llm.pause_generation(mode="keep")
    port, world = free_test_port(), dist.get_world_size() + 1
    with open(log, "w") as f:
        trainer = subprocess.Popen([sys.executable, "-m", "tests.distributed.trainer_stub",
                                    "127.0.0.1", str(port), str(world), b_path],
                                   stdout=f, stderr=subprocess.STDOUT)
    weights = tensors(b_path)
    await llm.init_weight_update_group("127.0.0.1", port, rank_offset=1, world_size=world)
    await llm.update_weights_from_distributed([n for n, _ in weights],
                                              [t.dtype for _, t in weights],
                                              [tuple(t.shape) for _, t in weights])
    code = trainer.wait(timeout=60)
    await llm.resume_generation()
    outs = await kept
    new = await collect(llm, PROMPTS[0], sp, "new")
    return {"trainer_exit": code, "kept_reason": outs[-1].outputs[0].finish_reason,
            "kept_tokens": len(outs[-1].outputs[0].token_ids),
            "new": new[-1].outputs[0].token_ids}


def main() -> None:
    models = dict(kv.split("=", 1) for kv in sys.argv[1].split(","))
    out_path, plans = sys.argv[2], sys.argv[3:]
    report = {}
    for plan in plans:
        llm = AsyncLLM(models["A"], **engine_kwargs(plan))  # other ranks follow rank 0
        if llm.is_driver:
            report[plan] = asyncio.run(drive(llm, models["B"], out_path + f".{plan}.log"))
        llm.close()
    if report:
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
