"""Process-group state: torch.distributed start-up and megatron-core ``parallel_state`` layouts.

This is the only module that holds global mutable state (the active layout), mirroring
megatron-core's own ``parallel_state``.
"""

from __future__ import annotations

import atexit
import datetime
import os
import re
import socket
import sys

import torch
import torch.distributed as dist

from seesaw_mcore import env, jit_ops, quiet
from seesaw_mcore.config import ParallelConfig, check_world
from seesaw_mcore.contract import RankInfo
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.runtime import cluster
from seesaw_mcore.runtime.watchdog import Watchdog

_ACTIVE: "RankInfo | None" = None
_WATCHDOG: "Watchdog | None" = None
_CRASHED = False  # an uncaught exception is ending the process
_HOST_GROUP = None  # see host_group()
_PREPARED: "dict[ParallelConfig, tuple[dict[str, object], RankInfo]]" = {}


def accelerator():
    """DeepSpeed's accelerator abstraction (CPU here, CUDA on GPUs)."""
    quiet.quiet_accelerator_detection()
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def device() -> torch.device:
    """The device this rank computes on."""
    acc = accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(acc.current_device()))


def size_threads() -> tuple[int, str]:
    """Sets this rank's torch intra-op threads to its share of the node's cores: the cores
    this process may run on (``SLURM_CPUS_PER_TASK`` under Slurm) divided by the ranks on the
    node, at least 1. ``OMP_NUM_THREADS``, when set, wins. Without this every rank starts one
    thread per core, and two ranks on two cores run ~10x slower.

    Returns:
        ``(threads, why)``; rank 0 logs it once.
    """
    if env.omp_threads_set():
        n, why = torch.get_num_threads(), "OMP_NUM_THREADS"
    else:
        cores = env.slurm_cpus_per_task() * env.local_world_size() or len(
            os.sched_getaffinity(0))
        n = max(1, cores // env.local_world_size())
        why = f"{cores} cores / {env.local_world_size()} ranks on this node"
        torch.set_num_threads(n)
    if env.is_rank_zero() and not getattr(size_threads, "_logged", False):
        size_threads._logged = True
        print(f"threads per rank: {n} ({why})", file=sys.stderr)
    return n, why


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_s: float = 300.0) -> tuple[int, int]:
    """Starts torch.distributed (via DeepSpeed) once; works under the deepspeed launcher,
    torchrun, srun-style env vars, or a plain single ``python`` process.

    Args:
        timeout_s: collective timeout; a rank that dies makes the others fail after this.

    Returns:
        ``(rank, world_size)``.
    """
    if not dist.is_initialized():
        if cluster.in_srun_step():  # srun sets only SLURM_* variables
            os.environ.update(cluster.slurm_env())
        elif "RANK" not in os.environ:  # plain `python`: a world of one
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        if "LOCAL_WORLD_SIZE" in os.environ:  # torchrun: DeepSpeed's shm all-reduce reads
            os.environ.setdefault("LOCAL_SIZE", os.environ["LOCAL_WORLD_SIZE"])  # this name
        size_threads()
        import deepspeed

        acc = accelerator()
        if acc.device_name() != "cpu":
            local = env.local_rank()
            if local >= acc.device_count():
                raise SeesawError(
                    f"local rank {local} of {env.local_world_size()} on this node, but it has "
                    f"{acc.device_count()} {acc.device_name()} devices; start at most one "
                    f"rank per device{cluster.world_hint()}")
            acc.set_device(local)
        if acc.device_name() == "cpu":
            # DeepSpeed JIT-builds its shm all-reduce op in init_distributed: build it first
            # under our build lock, so a build killed mid-way (Ctrl-C, a time limit) cannot
            # leave torch's lock file to hang every later start (jit_ops.py)
            from deepspeed.comm.torch import build_shm_op

            with jit_ops.build_lock("deepspeed_shm_comm"), quiet.native_output():
                build_shm_op()
        with quiet.native_output():  # DeepSpeed's shm op build prints compiler lines
            deepspeed.init_distributed(
                dist_backend=acc.communication_backend_name(),
                timeout=datetime.timedelta(seconds=timeout_s),
                verbose=False,
            )
        _unlink_deepspeed_shm()
        global _HOST_GROUP
        # Step plans and sampled tokens are host data: on GPUs they travel over a gloo group
        # (no host->device copy, device broadcast and read-back per step, as vLLM's CPU
        # message queue); on CPU ranks the default group is gloo already.
        _HOST_GROUP = (dist.new_group(backend="gloo") if acc.device_name() != "cpu"
                       and dist.get_world_size() > 1 else None)
        _start_watchdog()
    return dist.get_rank(), dist.get_world_size()


def host_group():
    """The whole world over gloo, for host tensors (``None``: the default group is gloo)."""
    return _HOST_GROUP


def _start_watchdog() -> None:
    """Peer-failure detection for this process (see ``runtime/watchdog.py``)."""
    global _WATCHDOG
    _WATCHDOG = Watchdog(dist.get_rank(), dist.get_world_size(),
                         stale_s=env.watchdog_stale_s())
    hook = sys.excepthook

    def excepthook(*exc) -> None:  # a crash is not a normal exit: peers should report it
        global _CRASHED
        _CRASHED = True
        hook(*exc)

    if not getattr(hook, "_seesaw", False):  # once per process
        excepthook._seesaw = True
        sys.excepthook = excepthook
        atexit.register(_at_exit)


def _at_exit() -> None:
    if _WATCHDOG is not None and not _CRASHED:
        _WATCHDOG.announce_exit()
        _WATCHDOG.disarm()


def watchdog() -> "Watchdog | None":
    """This process's watchdog (``None`` before ``init_distributed``)."""
    return _WATCHDOG


def _ps_state() -> dict[str, object]:
    """megatron-core ``parallel_state``'s module-level group globals (``_NAME`` upper case)."""
    from seesaw_mcore.mcore import parallel_state as ps

    return {k: v for k, v in vars(ps).items() if re.fullmatch(r"_[A-Z0-9_]+", k)}


def _build(layout: ParallelConfig) -> tuple[dict[str, object], RankInfo]:
    """Creates ``layout``'s megatron-core groups (a collective over every rank)."""
    from seesaw_mcore.mcore import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()  # only clears the globals; the groups stay alive
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        create_gloo_process_groups=False,
    )
    rank = dist.get_rank()
    dp_rank, tp_rank, pp_rank = layout.coords(rank)
    ep_rank = layout.ep_rank(rank)
    if (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
            ps.get_expert_model_parallel_rank()) != (tp_rank, pp_rank, ep_rank):
        raise RuntimeError(f"megatron-core rank order differs from ours for {layout}")
    prev_rank = layout.rank_of(dp_rank, tp_rank, pp_rank - 1) if pp_rank > 0 else None
    last = layout.pp - 1
    next_rank = layout.rank_of(dp_rank, tp_rank, pp_rank + 1) if pp_rank < last else None
    info = RankInfo(layout=layout, rank=rank, dp_rank=dp_rank, tp_rank=tp_rank,
                    pp_rank=pp_rank, tp_group=ps.get_tensor_model_parallel_group(),
                    prev_rank=prev_rank, next_rank=next_rank, ep_rank=ep_rank,
                    ep_group=ps.get_expert_model_parallel_group() if layout.ep > 1 else None)
    return _ps_state(), info


def prepare(layouts: list[ParallelConfig]) -> None:
    """Builds every layout's groups once, up front (collective: same list on every rank).

    megatron-core's ``destroy_model_parallel`` only forgets its groups, so destroy +
    initialize at every switch would leak ~17 process groups per switch and cost 8-26 ms
    (2 gloo ranks). Built once, a switch just restores the saved globals (microseconds).
    """
    for layout in layouts:
        check_world(layout, dist.get_world_size())
        if layout not in _PREPARED:
            _PREPARED[layout] = _build(layout)


def _unlink_deepspeed_shm() -> None:
    """DeepSpeed's CPU shm all-reduce (set up inside ``init_distributed`` when every rank is
    local) leaves a ~69 MB file per rank in /dev/shm forever. Every rank maps every peer's
    file before ``init_distributed`` returns, so after a barrier each rank can unlink its
    own: the mappings stay valid and nothing is left behind, even after a crash."""
    path = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_"
            f"{os.environ.get('MASTER_ADDR')}_{os.environ.get('MASTER_PORT')}_{dist.get_rank()}")
    if dist.get_world_size() > 1:
        dist.barrier()
    if os.path.exists(path):
        os.unlink(path)


def activate(layout: ParallelConfig) -> RankInfo:
    """Makes ``layout`` the active megatron-core ``parallel_state``.

    Args:
        layout: the parallel layout; DP x TP x PP must equal the world size. Not yet
            prepared: its groups are built now (a collective: every rank must call).

    Returns:
        This rank's place in it.
    """
    global _ACTIVE
    from seesaw_mcore.mcore import parallel_state as ps

    prepare([layout])
    if _ACTIVE is not None and _ACTIVE.layout == layout:
        return _ACTIVE
    state, info = _PREPARED[layout]
    for name, value in state.items():
        setattr(ps, name, value)
    _ACTIVE = info
    return _ACTIVE


def num_process_groups() -> int:
    """Live torch.distributed process groups. Only a test calls it, and it is that test's
    subject: no process group leaks over many switches (``tests/distributed/seesaw_job``)."""
    from torch.distributed import distributed_c10d as c10d

    return len(c10d._world.pg_map)


def active() -> RankInfo:
    """The active layout's ``RankInfo``; raises if none was activated."""
    if _ACTIVE is None:
        raise RuntimeError("no parallel layout is active; call groups.activate(layout) first")
    return _ACTIVE


def shutdown() -> None:
    """Meets the other ranks at a barrier, stops the watchdog, and destroys megatron-core
    groups and the default process group (collective)."""
    global _ACTIVE, _WATCHDOG
    from seesaw_mcore.mcore import parallel_state as ps

    if _WATCHDOG is not None:
        if dist.is_initialized():
            dist.barrier()  # a dead peer here is the watchdog's to report
        _WATCHDOG.disarm()
        _WATCHDOG = None
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    _ACTIVE = None
    _PREPARED.clear()
    global _HOST_GROUP
    _HOST_GROUP = None
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_if_peer_lost(e: Exception) -> None:
    """A collective broke: let the watchdog name the rank that is gone (it exits)."""
    wd = watchdog()
    if wd is not None and _is_comm_error(e):
        wd.exit_if_peer_lost()


def _is_comm_error(e: BaseException) -> bool:
    """A collective or point-to-point failure (a peer may be gone), not an engine error."""
    text = str(e)
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError) and any(k in text for k in ("gloo", "NCCL", "Connection")))
