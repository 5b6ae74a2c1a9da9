"""Runs the vision tower over the images of many concurrent requests at once, bounded by a patch budget.

Callers submit one image (pixel patches + grid) and get a Future of its (embeds, deepstack) rows.
One worker thread drains the queue: it takes waiting images in arrival order until the patch
budget is reached, runs ONE forward over them, splits the rows per image and resolves the futures.
An exception fails every future of that batch, never the worker. A future cancelled while still
queued (its request timed out) is skipped. `busy`/`last_progress` let health checks tell a busy
encoder from a stuck one without queueing behind real work.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

log = logging.getLogger(__name__)


@dataclass
class _Item:
    pixels: torch.Tensor  # [P, patch_dim]
    grid: list[int]  # [t, h, w]
    future: Future = field(default_factory=Future)


class VisionBatcher:
    def __init__(self, vision_model, max_batch_patches: int, name: str = "vision-batcher") -> None:
        self.model = vision_model
        self.max_batch_patches = max_batch_patches
        self._queue: queue.Queue[_Item | None] = queue.Queue()
        self.batches = 0
        self.images = 0
        self.last_progress = float("-inf")  # when a batch last finished
        self._running = 0
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(self, pixels: torch.Tensor, grid: list[int]) -> Future:
        item = _Item(pixels, list(grid))
        self._queue.put(item)
        return item.future

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def busy(self) -> bool:
        return self._running > 0 or not self._queue.empty()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5)

    def _take_batch(self, first: _Item) -> list[_Item]:
        batch, patches = [first], first.pixels.shape[0]
        while True:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                return batch
            if nxt is None:
                self._queue.put(None)  # re-post the stop signal for the loop
                return batch
            if patches + nxt.pixels.shape[0] > self.max_batch_patches:
                self._pending = nxt
                return batch
            batch.append(nxt)
            patches += nxt.pixels.shape[0]

    def _loop(self) -> None:
        self._pending: _Item | None = None
        while True:
            item = self._pending if self._pending is not None else self._queue.get()
            self._pending = None
            if item is None:
                return
            batch = [b for b in self._take_batch(item) if b.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            self._running = len(batch)
            try:
                with torch.no_grad():
                    embeds, deepstack = self.model(
                        torch.cat([b.pixels for b in batch]), torch.tensor([b.grid for b in batch])
                    )
                sizes = [t * h * w // self.model.merge_unit for t, h, w in (b.grid for b in batch)]
                for b, e, d in zip(batch, embeds.split(sizes), deepstack.split(sizes), strict=False):
                    b.future.set_result((e, d))
                self.batches += 1
                self.images += len(batch)
            except Exception as e:  # noqa: BLE001 - every waiter must hear about it
                log.exception("vision batch of %d images failed", len(batch))
                for b in batch:
                    if not b.future.done():
                        b.future.set_exception(e)
            finally:
                self._running = 0
                self.last_progress = time.monotonic()
