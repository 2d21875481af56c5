"""Every environment variable the engine reads, in one place.

Configuration belongs in ``EngineConfig`` (``LLM(...)`` keyword arguments, Hydra overrides);
these are the knobs that are not part of a job's configuration: the launcher's facts about
the node, switches for A/B measurements and debugging, fault injection for the reliability
tests. Each is read here, at the moment it is needed, so a test may set it per process.

========================================  ==========================================================
Variable                                  Meaning
========================================  ==========================================================
``LOCAL_SIZE`` / ``LOCAL_WORLD_SIZE``     ranks on this node (DeepSpeed's / torchrun's launcher)
``LOCAL_RANK``                            this rank's index on its node (device selection)
``DS_ACCELERATOR``                        DeepSpeed's accelerator; set to ``cpu`` when no CUDA
``SLURM_CPUS_PER_TASK``                   cores per rank under Slurm (thread sizing)
``OMP_NUM_THREADS``                       when set, wins over the engine's own thread sizing
``SEESAW_CPU_PACKED_LINEAR=0``            CPU ranks: plain ``F.linear`` instead of oneDNN-packed
``SEESAW_DISABLE_SHM_ALLREDUCE=1``        CPU ranks: gloo all-reduce instead of DeepSpeed's shm one
``SEESAW_WATCHDOG_STALE_S``               seconds without a peer's heartbeat: it counts as lost
``SEESAW_FAULT_KILL=RANK:KIND:N``         tests: SIGKILL rank RANK at its N-th step of KIND
``SEESAW_FAULT_SLOW=PLAN=S[,...]``        tests: every step of plan PLAN sleeps S seconds
``SEESAW_CACHE_DIR``                      where measured planner profiles are cached
``TORCH_EXTENSIONS_DIR``                  where the C++ ops are built (default: in the venv)
``TRITON_INTERPRET=1``                    run Triton kernels on CPU (tests)
========================================  ==========================================================
"""

from __future__ import annotations

import os


def local_world_size() -> int:
    """Ranks on this node, from the launcher's environment (1 when not launched)."""
    return int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1")))


def local_rank() -> int:
    """This rank's index on its node (``LOCAL_RANK``, 0 when not launched)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def slurm_cpus_per_task() -> int:
    """``SLURM_CPUS_PER_TASK``, 0 when unset."""
    return int(os.environ.get("SLURM_CPUS_PER_TASK", 0))


def omp_threads_set() -> bool:
    """Whether the user fixed the thread count with ``OMP_NUM_THREADS``."""
    return bool(os.environ.get("OMP_NUM_THREADS"))


def cpu_packed_linear() -> bool:
    """oneDNN-packed float32 linears on CPU ranks (default on)."""
    return os.environ.get("SEESAW_CPU_PACKED_LINEAR", "1") != "0"


def decode_padding() -> bool:
    """CPU ranks run decode steps padded to CUDA-graph buckets, as GPUs do (a test knob for
    the padding path; ``SEESAW_DECODE_PADDING=1``)."""
    return os.environ.get("SEESAW_DECODE_PADDING") == "1"


def shm_allreduce_disabled() -> bool:
    """Whether DeepSpeed's shared-memory all-reduce is switched off."""
    return os.environ.get("SEESAW_DISABLE_SHM_ALLREDUCE") == "1"


def watchdog_stale_s() -> float:
    """Seconds without a peer's heartbeat before the watchdog declares it lost."""
    return float(os.environ.get("SEESAW_WATCHDOG_STALE_S", "30"))


def fault_kill() -> list[str] | None:
    """``SEESAW_FAULT_KILL`` split into ``[rank, kind, n]``, or None."""
    fault = os.environ.get("SEESAW_FAULT_KILL")
    return fault.split(":") if fault else None


def fault_slow() -> dict[str, float]:
    """``SEESAW_FAULT_SLOW`` as ``{plan: seconds}`` (``"P2:T2=0.05,D2=0.01"``)."""
    out = {}
    for item in filter(None, os.environ.get("SEESAW_FAULT_SLOW", "").split(",")):
        plan, _, seconds = item.partition("=")
        out[plan] = float(seconds)
    return out


def cache_dir() -> str:
    """Where measured planner profiles (and their calibration models) are kept."""
    return os.environ.get("SEESAW_CACHE_DIR",
                          os.path.join(os.path.expanduser("~"), ".cache", "seesaw_mcore"))


def triton_interpret() -> bool:
    """Whether Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def is_rank_zero() -> bool:
    """``RANK`` is 0 or unset (before torch.distributed starts)."""
    return os.environ.get("RANK", "0") == "0"
