"""A rank's paged KV cache: one flat device buffer, viewed per layout.

Every layout of a plan gets its own number of blocks (a layout with fewer KV heads per
rank fits more), all in one buffer sized for the largest; the live layout's view is
``[local layers, 2, NB + 1, BS, Hkv/TP, D]`` (the extra block is the null block that
padded decode rows write to).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from seesaw_mcore.config import ModelConfig, ParallelConfig
from seesaw_mcore.kv.copier import KVView
from seesaw_mcore.kv.layout import KVShardLayout
from seesaw_mcore.runtime import memory


class KVBuffer:
    """The flat buffer, its block counts and the live layout's views of it.

    Args:
        cfg: model architecture.
        layouts: every layout the rank may run.
        dtype: the cache's dtype.
        block_size: tokens per block.
        device: where the buffer lives.
    """

    def __init__(self, cfg: ModelConfig, layouts: list[ParallelConfig], dtype: torch.dtype,
                 block_size: int, device: torch.device) -> None:
        self.cfg, self.dtype, self.block_size, self.device = cfg, dtype, block_size, device
        self.kv_layouts = {lay: KVShardLayout(lay, cfg.num_layers, cfg.num_kv_heads)
                           for lay in layouts}
        self.num_blocks: dict[ParallelConfig, int] = {}
        self._flat: torch.Tensor | None = None
        self._bound: tuple[ParallelConfig, int, int] | None = None
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []  # per local layer (K, V)
        self.view: KVView | None = None  # what tier copies address
        self.version = 0  # changes whenever the views do (captured graphs hold the old ones)

    @property
    def nbytes(self) -> int:
        """Bytes of the buffer (0 when none is allocated)."""
        return 0 if self._flat is None else self._flat.numel() * self.dtype.itemsize

    def allocate(self, num_blocks: int | dict[ParallelConfig, int]) -> None:
        """Allocates ``num_blocks`` blocks under each layout (one number: the same for
        every layout), in one zeroed buffer sized for the largest; views the live layout's
        part when one is bound."""
        if isinstance(num_blocks, int):
            num_blocks = {lay: num_blocks for lay in self.kv_layouts}
        self.num_blocks = dict(num_blocks)
        nbytes = max((n + 1) * memory.kv_bytes_per_block(self.cfg, lay, self.block_size,
                                                         self.dtype)
                     for lay, n in self.num_blocks.items())
        self._flat, self.layers, self.view = None, [], None  # the old buffer goes first
        self._flat = torch.zeros(nbytes // self.dtype.itemsize, dtype=self.dtype,
                                 device=self.device)
        self._make_views()

    def bind(self, layout: ParallelConfig, rank: int, num_local_layers: int) -> None:
        """Views the buffer as ``layout``'s rank ``rank`` with ``num_local_layers`` layers
        (now, or when the buffer is allocated)."""
        self._bound = (layout, rank, num_local_layers)
        self._make_views()

    def drop(self) -> None:
        """Forgets the buffer and its views (the binding stays)."""
        self.num_blocks, self._flat, self.layers, self.view = {}, None, [], None
        self.version += 1

    @contextlib.contextmanager
    def scratch(self, num_blocks: int) -> Iterator[None]:
        """A buffer of ``num_blocks`` blocks (a profiling run's), dropped on exit."""
        self.allocate(num_blocks)
        try:
            yield
        finally:
            self.drop()

    def _make_views(self) -> None:
        """Per local layer, K and V ``[NB, BS, Hkv/TP, D]`` views of the live layout."""
        if self._flat is None or self._bound is None:
            return
        layout, rank, n = self._bound
        nb = self.num_blocks[layout] + 1  # + the null block
        hkv = self.cfg.num_kv_heads // layout.tp
        shape = (n, 2, nb, self.block_size, hkv, self.cfg.head_dim)
        kv = self._flat[: math.prod(shape)].view(shape)
        self.layers = [(kv[i, 0], kv[i, 1]) for i in range(n)]
        kvl = self.kv_layouts[layout]
        self.view = KVView(kv.flatten(2, 3), self.block_size,  # [n, 2, NB * BS, h, D]
                           kvl.layer_range(rank)[0], kvl.head_range(rank))
        self.version += 1
