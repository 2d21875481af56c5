"""A trainer's rank 0 for the weight-update test: hosts the update group's rendezvous and
broadcasts a checkpoint's tensors (sorted by name) to the engine's ranks, then closes the
group (as a trainer that exits must)."""

from __future__ import annotations

import os
import sys

from seesaw_mcore.runtime.weight_sync import WeightUpdateGroup
from tests.distributed.training_loop_job import tensors


def main() -> None:
    addr, port, world, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    group = WeightUpdateGroup(addr, port, rank=0, world_size=world)
    for _, t in tensors(path):
        group.broadcast(t.contiguous())
    group.close()


if __name__ == "__main__":
    main()
    # Past this point only the interpreter's and libtorch's teardown runs, which this test
    # does not check: once, in CI, a stub aborted there ("terminate called without an active
    # exception", exit 1) after every broadcast had arrived and failed the whole module.
    sys.stdout.flush()
    os._exit(0)
