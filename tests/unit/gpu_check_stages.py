"""Stand-in stages for ``tests/unit/test_gpu_check.py``: each runs in its own process, as
the GPU check's real stages do (``module:function`` taking ``(device, root, quick)``)."""

from __future__ import annotations

import time


def ok(dev, root, quick) -> dict:
    return {"ran": True, "device": str(dev)}


def boom(dev, root, quick) -> dict:
    raise RuntimeError("no kernel image is available")


def sleep_forever(dev, root, quick) -> dict:
    while True:  # a hang (NCCL set-up, graph capture): only the stage's limit ends it
        time.sleep(0.2)


def leaves_groups(dev, root, quick) -> dict:
    """Makes process groups and leaves them: the stage's process must shut them down."""
    import torch
    import torch.distributed as dist

    group = dist.new_group(backend="gloo")
    t = torch.ones(1)
    dist.all_reduce(t, group=group)
    return {"groups": len(dist.distributed_c10d._world.pg_map), "sum": float(t)}
