"""A process group between a trainer and the engine's ranks for weight updates (vLLM's RLHF
example, SGLang's ``init_weights_update_group``).

The trainer's rank 0 and every engine rank meet at ``master_address:master_port`` (the
trainer hosts the store) in a group of their own, apart from the engine's job: trainer rank
0 is group rank 0, engine rank ``i`` is ``rank_offset + i``. The trainer then broadcasts each
tensor; every engine rank receives it and takes its slices (``LLM.update_weights``). NCCL on
GPUs, gloo on CPU ranks.

Trainer side::

    from seesaw_mcore.runtime.weight_sync import WeightUpdateGroup
    group = WeightUpdateGroup("10.0.0.1", 29600, rank=0, world_size=1 + engine_ranks)
    for name, t in model.state_dict().items():   # in the order the engine was told
        group.broadcast(t)
    group.close()                                # before the process exits
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import torch
import torch.distributed as dist

from seesaw_mcore.errors import SeesawError


class WeightUpdateGroup:
    """A standalone process group (not the job's): broadcasts from its rank 0.

    Args:
        master_address / master_port: where the trainer's rank 0 hosts the rendezvous.
        rank: this process's rank in the group (trainer 0; engine ranks after it).
        world_size: trainer rank 0 plus every engine rank.
        device: where tensors travel (``cuda`` -> NCCL, ``cpu`` -> gloo).
        timeout_s: the rendezvous and collective timeout.
    """

    def __init__(self, master_address: str, master_port: int, rank: int, world_size: int,
                 device: torch.device | str = "cpu", timeout_s: float = 300.0) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.store = dist.TCPStore(master_address, master_port, world_size,
                                   is_master=rank == 0, timeout=timeout)
        if self.device.type == "cuda":
            self.pg = dist.ProcessGroupNCCL(self.store, rank, world_size)
        else:
            self.pg = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Sends ``tensor`` from group rank ``src`` (others: receives into it)."""
        if self.pg is None:
            raise SeesawError("the weight-update group is closed")
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        self.pg.broadcast([tensor], opts).wait()
        return tensor

    def close(self) -> None:
        """Shuts the group down: its communicator's threads are joined, then the store (on
        the trainer's rank 0, the rendezvous server) is released, in that order, while the
        interpreter is whole (left to its teardown, they go in no fixed order). Call it
        before the process exits; ``LLM.close`` closes the engine's. Idempotent."""
        if self.pg is not None:
            self.pg.shutdown()
        self.pg = self.store = None

    def receive(self, names: list[str], dtypes: list, shapes: list,
                check: Callable[[list[tuple[str, torch.Tensor]]], None]
                ) -> list[tuple[str, torch.Tensor]]:
        """Receives ``names`` (of ``dtypes``, torch dtypes or their names, and ``shapes``)
        from group rank 0, in that order, as host tensors. ``check`` sees them first as
        meta tensors; what it raises is raised after every broadcast is received, so the
        sender is never left waiting."""
        if not len(names) == len(dtypes) == len(shapes):
            raise SeesawError(f"update_weights_from_distributed: {len(names)} names, "
                              f"{len(dtypes)} dtypes, {len(shapes)} shapes")
        dtypes = [getattr(torch, d) if isinstance(d, str) else d for d in dtypes]
        meta = [(n, torch.empty(s, dtype=d, device="meta")) for n, s, d in
                zip(names, shapes, dtypes)]
        try:
            check(meta)
            error = None
        except SeesawError as e:
            error = e
        received = []
        for _, t in meta:
            buf = torch.empty(t.shape, dtype=t.dtype, device=self.device)
            received.append(self.broadcast(buf, src=0).to("cpu"))
        if error is not None:
            raise error
        return list(zip(names, received))
