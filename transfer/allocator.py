"""Free list of the receive pool's blocks, with bounded waiting when the pool is momentarily full.

`alloc(n)` prefers a run of consecutive blocks (so a finished request reads back as views, no
copy), and `alloc(n, after=b)` prefers to extend a room's last block. It holds no tensors and is
shared by the API threads and the receiver's control thread (one lock + condition).
"""

from __future__ import annotations

import bisect
import threading
import time


class PoolExhausted(RuntimeError):
    """No blocks came free within the wait bound."""


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks))  # sorted
        self._cond = threading.Condition()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def try_alloc(self, n: int, after: int | None = None) -> list[int] | None:
        if n <= 0:
            return []
        with self._cond:
            if n > len(self._free):
                return None
            start = self._run_start(n, after)
            if start is not None:
                i = bisect.bisect_left(self._free, start)
                got = self._free[i : i + n]
                del self._free[i : i + n]
            else:
                got, self._free = self._free[:n], self._free[n:]
            return got

    def alloc(self, n: int, timeout_s: float, after: int | None = None) -> list[int]:
        """Blocks now, or as soon as enough are freed; PoolExhausted after `timeout_s`."""
        if n > self.num_blocks:
            raise PoolExhausted(f"{n} blocks asked, the pool has {self.num_blocks} in all")
        end = time.monotonic() + timeout_s
        with self._cond:
            while True:
                got = self.try_alloc(n, after)
                if got is not None:
                    return got
                left = end - time.monotonic()
                if left <= 0:
                    raise PoolExhausted(f"{n} blocks asked, {len(self._free)} free after {timeout_s:.1f}s")
                self._cond.wait(left)

    def free(self, blocks: list[int]) -> None:
        if not blocks:
            return
        with self._cond:
            for b in blocks:
                if not 0 <= b < self.num_blocks:
                    raise ValueError(f"block {b} is outside the pool")
                i = bisect.bisect_left(self._free, b)
                if i < len(self._free) and self._free[i] == b:
                    raise ValueError(f"block {b} freed twice")
                self._free.insert(i, b)
            self._cond.notify_all()

    def _run_start(self, n: int, after: int | None) -> int | None:
        """First block of n consecutive free ones (right after `after` if possible), else None."""
        free = self._free
        if after is not None:
            i = bisect.bisect_left(free, after + 1)
            if i + n <= len(free) and free[i] == after + 1 and free[i + n - 1] == after + n:
                return after + 1
        run = 1
        for i in range(1, len(free) + 1):
            if run >= n:
                return free[i - n]
            if i < len(free):
                run = run + 1 if free[i] == free[i - 1] + 1 else 1
        return None
