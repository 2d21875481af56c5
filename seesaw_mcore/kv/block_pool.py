"""Device paged-KV block accounting (scheduler side; holds no tensors)."""

from __future__ import annotations


class BlockPool:
    """Fixed-size KV blocks handed out to sequences as block tables.

    Args:
        num_blocks: blocks in the device cache.
        block_size: tokens per block.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got "
                             f"{num_blocks}, {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # stack: pop() gives low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, table: list[int], num_tokens: int) -> bool:
        """Whether ``table`` can grow to hold ``num_tokens`` tokens."""
        return self.blocks_for(num_tokens) - len(table) <= len(self._free)

    def allocate(self, table: list[int], num_tokens: int) -> None:
        """Grows ``table`` in place to hold ``num_tokens`` tokens.

        Raises:
            RuntimeError: if not enough blocks are free (call ``can_allocate`` first).
        """
        need = self.blocks_for(num_tokens) - len(table)
        if need > len(self._free):
            raise RuntimeError(f"out of KV blocks: need {need}, have {len(self._free)}")
        for _ in range(max(need, 0)):
            table.append(self._free.pop())

    def free(self, table: list[int]) -> None:
        """Returns every block of ``table`` to the pool and empties it."""
        self._free.extend(reversed(table))
        table.clear()
