"""The ``measure`` hardware profile: this machine's ranks measured for the planner's cost
model (memory bandwidth, matmul throughput, the engine's TP all-reduce, pipeline send/recv,
the host link), cached in a file so each machine is measured once.

Measured under the launcher (every rank calls ``measure``), or, from a plain process
(``python -m seesaw_mcore.planner --gpu measure``), on ranks the deepspeed launcher starts
for the purpose (``python -m seesaw_mcore.planner.profile`` under it).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import asdict

import torch
import torch.distributed as dist

from seesaw_mcore import env
from seesaw_mcore.planner.calibrate import best_time, calibrate
from seesaw_mcore.planner.hardware import GIB, Hardware

PROFILE_VERSION = 2  # bump when Hardware gains measured fields: old caches are re-measured


def cache_file(world: int) -> str:
    """``$SEESAW_CACHE_DIR`` (default ``~/.cache/seesaw_mcore``)/
    ``profile-vN-HOST-DEVICE-WORLD.json``."""
    from deepspeed.accelerator import get_accelerator

    root = env.cache_dir()
    name = (f"profile-v{PROFILE_VERSION}-{socket.gethostname()}-"
            f"{get_accelerator().device_name()}-{world}.json")
    return os.path.join(root, name)


def load_or_measure(world: int) -> Hardware:
    """The cached profile for ``world`` ranks, else measured now (and cached): on the running
    job's ranks when ``world`` is its world size, else on ranks spawned for it."""
    path = cache_file(world)
    hw = _read(path)
    if hw is not None:
        return hw
    if dist.is_initialized() and dist.get_world_size() == world:
        return measure()
    _launch(world)
    hw = _read(path)
    if hw is None:
        raise RuntimeError(f"the profile measured for {world} ranks is unreadable: {path}")
    return hw


def _read(path: str) -> Hardware | None:
    """The profile cached at ``path``; ``None`` when missing or written by another version
    (then it is measured again)."""
    try:
        with open(path, encoding="utf-8") as f:
            return Hardware(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def _launch(world: int) -> None:
    """Measures on ``world`` local ranks started by the deepspeed launcher."""
    import subprocess
    import sys

    from seesaw_mcore.errors import SeesawError

    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [launcher, "--no_local_rank", "--num_gpus", str(world), "--master_port", str(port),
           "--module", "seesaw_mcore.planner.profile"]
    proc = subprocess.run(cmd, capture_output=True, text=True)  # threads: groups.size_threads
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise SeesawError(f"measuring the {world}-rank profile failed: {' | '.join(tail)}")


def measure() -> Hardware:
    """Measures this job's ranks (call on every rank); rank 0 writes the cache file. Each
    figure is the slowest rank's, measured with every rank busy at once, as in a run."""
    import psutil

    from seesaw_mcore.model.layers import TPAllReduce
    from seesaw_mcore.runtime import groups

    dev, acc = groups.device(), groups.accelerator()
    world, rank = dist.get_world_size(), dist.get_rank()
    cpu = dev.type == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    n = 64 * 2**20 // dtype.itemsize
    src, dst = torch.ones(n, dtype=dtype, device=dev), torch.empty(n, dtype=dtype, device=dev)
    mem_gbs = 2 * src.nbytes / best_time(lambda: dst.copy_(src)) / GIB  # read + write
    m, k = (512, 2048) if cpu else (8192, 8192)
    a = torch.randn(m, k, dtype=dtype, device=dev)
    b = torch.randn(k, k, dtype=dtype, device=dev)
    tflops = 2 * m * k * k / best_time(lambda: a @ b) / 1e12
    allreduce_gbs = p2p_gbs = 1e9  # one rank: no communication
    ar_lat = p2p_lat = 0.0
    if world > 1:
        reduce = TPAllReduce(dist.group.WORLD)  # the engine's route for TP = world
        big = torch.ones(512, 2048, dtype=dtype, device=dev)
        small = torch.ones(1, 2048, dtype=dtype, device=dev)
        ar_lat = best_time(lambda: reduce(small), repeats=20)
        t = best_time(lambda: reduce(big))
        allreduce_gbs = 2 * (world - 1) / world * big.nbytes / max(t - ar_lat, 1e-9) / GIB

        def send_recv(x: torch.Tensor) -> None:
            if rank == 0:
                dist.send(x, dst=1)
            elif rank == 1:
                dist.recv(x, src=0)

        p2p_lat = best_time(lambda: send_recv(small), repeats=20)
        p2p_gbs = big.nbytes / max(best_time(lambda: send_recv(big)) - p2p_lat, 1e-9) / GIB
    if cpu:  # the host tier is a memcpy away; device and host memory are the same RAM
        host_link = mem_gbs / 2
        ram = psutil.virtual_memory().available / env.local_world_size() / GIB
        mem_gib, host_gib = ram / 2, ram / 2
    else:
        pinned = torch.empty(n, dtype=dtype).pin_memory()
        host_link = pinned.nbytes / best_time(lambda: dst.copy_(pinned, non_blocking=True)) / GIB
        mem_gib = acc.total_memory() / GIB
        host_gib = psutil.virtual_memory().available / env.local_world_size() / GIB
    mine = [mem_gbs, tflops, allreduce_gbs, p2p_gbs, host_link, -ar_lat, -p2p_lat, mem_gib,
            host_gib]
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    worst = [min(col) for col in zip(*every)]  # slowest rank (latencies negated)
    hw = Hardware(f"measured ({world} {dev.type} ranks)", mem_gib=worst[7], mem_gbs=worst[0],
                  tflops=worst[1], allreduce_gbs=worst[2], p2p_gbs=worst[3],
                  host_link_gbs=worst[4], host_gib=worst[8], dtype_bytes=dtype.itemsize,
                  allreduce_latency_s=-worst[5], p2p_latency_s=-worst[6],
                  switch_copies_weights=not cpu)
    hw = calibrate(hw, dtype)
    if rank == 0:
        path = cache_file(world)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(hw), f, indent=2)
        os.replace(tmp, path)
    dist.barrier()
    return hw


if __name__ == "__main__":  # under the launcher: measure and cache
    from seesaw_mcore.runtime import groups

    torch.set_num_threads(1)
    groups.init_distributed()
    try:
        measure()
    finally:
        groups.shutdown()
