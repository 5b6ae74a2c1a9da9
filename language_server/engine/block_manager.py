"""Hands out KV-cache blocks from a free list and takes them back; nothing else.

Pure bookkeeping (block ids only, no tensors). A sequence holds exactly the blocks its computed
tokens need, grown one block at a time — no reservation up to the maximum length.
"""

from __future__ import annotations

from collections import deque


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        return [self._free.popleft() for _ in range(n)]

    def grow(self, blocks: list[int], num_tokens: int) -> bool:
        """Extend `blocks` in place to cover `num_tokens`; False (unchanged) if not enough are free."""
        need = self.blocks_for(num_tokens) - len(blocks)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        blocks.extend(self.allocate(need))
        return True

    def free(self, blocks: list[int]) -> None:
        self._free.extend(blocks)
        blocks.clear()
