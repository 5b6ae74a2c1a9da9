"""Hands out KV-cache blocks, counts who holds each one, and remembers which full blocks hold what.

Pure bookkeeping (block ids, reference counts and content keys; no tensors). A sequence holds
exactly the blocks its computed tokens need, grown one block at a time — no reservation up to the
maximum length. With `caching`, a full block gets its content key (`prefix.py`) once the step that
fills it is scheduled, and keeps it after its last holder frees it: `lookup` finds the longest run of
a new sequence's leading blocks already in the cache and `take` shares them (reference counted;
shared blocks are never written again: only full blocks are keyed and a sequence only writes past
what it holds). Free blocks are handed out uncached ones first, then cached ones least recently
freed first, dropping their key (LRU eviction), so caching never costs a sequence a block.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks, self.block_size, self.caching = num_blocks, block_size, caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # next out first
        self._refs = [0] * num_blocks
        self._key_of: dict[int, bytes] = {}  # block -> its content key
        self._block_of: dict[bytes, int] = {}  # content key -> the block holding it

    @property
    def num_free(self) -> int:
        """Blocks no sequence holds (cached ones included: they are evicted on demand)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a content key (held or free)."""
        return len(self._key_of)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            key = self._key_of.pop(b, None)
            if key is not None:
                del self._block_of[key]
            self._refs[b] = 1
            out.append(b)
        return out

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
        """Drop one hold on each block; a block nobody holds any more becomes free. Freed last to
        first, so a prefix's first blocks (the most shared) are the last of it to be evicted."""
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free[b] = None
                if b not in self._key_of:
                    self._free.move_to_end(b, last=False)  # nothing to keep: hand it out first
        blocks.clear()

    # -- prefix caching -----------------------------------------------------------------------
    def lookup(self, keys: list[bytes], max_blocks: int) -> list[int]:
        """The blocks holding the longest run of `keys[:max_blocks]` from the first (no side effects)."""
        if not self.caching:
            return []
        hit = []
        for key in keys[:max_blocks]:
            b = self._block_of.get(key)
            if b is None:
                break
            hit.append(b)
        return hit

    def reviving(self, blocks: list[int]) -> int:
        """How many of these cached blocks are free now (taking them uses up free blocks)."""
        return sum(1 for b in blocks if self._refs[b] == 0)

    def take(self, blocks: list[int]) -> None:
        """Hold these cached blocks (from `lookup`) for one more sequence."""
        for b in blocks:
            if self._refs[b] == 0:
                del self._free[b]
            self._refs[b] += 1

    def register(self, block: int, key: bytes) -> None:
        """`block` (held, full, its K/V written by the step being scheduled) holds `key`'s content.
        A key another block already holds stays with that one (two sequences computed it at once)."""
        if self.caching and key not in self._block_of and block not in self._key_of:
            self._block_of[key] = block
            self._key_of[block] = key
