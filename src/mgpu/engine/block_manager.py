"""Paged KV-cache bookkeeping: a free list of fixed-size blocks and one block table per sequence."""

from __future__ import annotations

from collections import deque

from mgpu.config import blocks_for_tokens


class BlockManager:
    """Hands out KV blocks. Pure Python; the tensors live in the workers.

    Args:
        num_blocks: blocks in the cache (the same on every rank).
        block_size: tokens per block.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any sequence."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, block_table: list[int], num_tokens: int) -> int:
        """Extra blocks a table needs to hold ``num_tokens`` tokens."""
        return max(0, blocks_for_tokens(num_tokens, self.block_size) - len(block_table))

    def can_allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether the table can grow to hold ``num_tokens`` tokens now."""
        return self.blocks_needed(block_table, num_tokens) <= len(self._free)

    def allocate(self, block_table: list[int], num_tokens: int) -> bool:
        """Grow ``block_table`` in place to hold ``num_tokens`` tokens; False if blocks run out."""
        need = self.blocks_needed(block_table, num_tokens)
        if need > len(self._free):
            return False
        block_table.extend(self._free.popleft() for _ in range(need))
        return True

    def free(self, block_table: list[int]) -> None:
        """Return every block of the table to the pool and empty it."""
        self._free.extend(block_table)
        block_table.clear()
