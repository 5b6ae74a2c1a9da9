"""Embedding cache of the encode server: image content hash -> its vision rows, LRU bounded by bytes.

Keys are digests of the encoded image bytes (the processor config is fixed per server), values the
merged embeddings and deepstack rows of that image. Thread-safe; counts hits, misses, evictions.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


def content_key(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=20).hexdigest()


@dataclass(frozen=True)
class CachedRows:
    grid_thw: tuple[int, int, int]
    embeds: torch.Tensor  # [R, H]
    deepstack: torch.Tensor  # [R, n_ds * H]

    @property
    def nbytes(self) -> int:
        return (
            self.embeds.numel() * self.embeds.element_size()
            + self.deepstack.numel() * self.deepstack.element_size()
        )


class EmbeddingCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, CachedRows] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    def get(self, key: str) -> CachedRows | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, key: str, rows: CachedRows) -> None:
        if rows.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            self._items[key] = rows
            self.bytes += rows.nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1

    def __len__(self) -> int:
        return len(self._items)
