"""The encode pipeline, transport-free: messages + decoded images -> everything the language side needs.

`Encoder.encode(messages, images)` renders the chat template, runs the image processor, looks each
image up in the embedding cache, sends the misses through the batched vision tower, and returns an
`EncodedPrompt`: expanded prompt ids, M-RoPE positions and delta, vision rows and deepstack rows.
With `cancelled` (an Event its caller sets when the request's client went away) it stops waiting
and takes its images that are still queued off the vision tower (`EncodeCancelled`). Writing the
rows to a language node is the service's job (`service.py`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from deepsplit.model.build import load_vision_model
from deepsplit.model.config import ModelConfig
from deepsplit.model.mrope import mrope_positions
from deepsplit.model.processor import Preprocessor
from encode_server.batcher import VisionBatcher
from encode_server.cache import CachedRows, EmbeddingCache, content_key

CANCEL_CHECK_S = 0.1  # how often a wait for the vision tower looks at `cancelled`


class EncodeCancelled(RuntimeError):
    """The caller gave the request up while its images waited for the vision tower."""


@dataclass
class EncodedPrompt:
    fill_ids: torch.Tensor  # [N] int32
    positions: torch.Tensor  # [3, N] int32
    mrope_delta: int
    embeds: torch.Tensor  # [V, H]
    deepstack: torch.Tensor  # [V, n_ds * H]
    num_images: int
    cache_hits: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class Encoder:
    def __init__(
        self,
        model_dir: str,
        max_batch_patches: int = 16384,
        cache_bytes: int = 256 * 2**20,
        dtype: str | None = None,
        max_pixels: int | None = None,
    ) -> None:
        self.cfg = ModelConfig.from_dir(model_dir)
        self.vision, _ = load_vision_model(model_dir, dtype=dtype, cfg=self.cfg)
        self.pre = Preprocessor.from_dir(model_dir, max_pixels=max_pixels)
        self.cache = EmbeddingCache(cache_bytes)
        self.batcher = VisionBatcher(self.vision, max_batch_patches)

    @property
    def hidden_size(self) -> int:
        return self.cfg.text.hidden_size

    def encode(
        self,
        messages: list[dict],
        images: list,
        image_bytes: list[bytes] | None = None,
        timeout_s: float | None = None,
        on_rows: Callable[[int], object] | None = None,
        cancelled: threading.Event | None = None,
    ) -> EncodedPrompt:
        """`images`: decoded PIL images in prompt order; `image_bytes`: their encoded bytes (cache keys).
        `on_rows(n)` is called with the prompt's row count as soon as it is known, before the vision
        tower's results are awaited (the service claims the language node's room then)."""
        t0 = time.perf_counter()
        keys = [content_key(b) for b in image_bytes] if image_bytes is not None else [None] * len(images)
        cached = [self.cache.get(k) if k else None for k in keys]
        misses = [i for i, c in enumerate(cached) if c is None]
        futures = {}
        grids: list[list[int]] = [list(c.grid_thw) if c else [] for c in cached]
        if misses:
            pixels, miss_grids = self.pre.images_to_patches([images[i] for i in misses])
            offsets = [0]
            for g in miss_grids:
                offsets.append(offsets[-1] + g[0] * g[1] * g[2])
            for j, i in enumerate(misses):
                grids[i] = miss_grids[j]
                futures[i] = self.batcher.submit(pixels[offsets[j] : offsets[j + 1]], miss_grids[j])
        t1 = time.perf_counter()
        ids = self.pre.expand(self.pre.render(messages), grids)
        positions, delta = mrope_positions(
            ids, self.cfg.image_token_id, grids, self.cfg.vision.spatial_merge_size
        )
        if on_rows is not None:
            on_rows(len(ids))
        embeds, deepstack = [], []
        for i in range(len(images)):
            if cached[i] is not None:
                e, d = cached[i].embeds, cached[i].deepstack
            else:
                try:
                    e, d = _rows(futures[i], timeout_s, cancelled)
                except (TimeoutError, EncodeCancelled) as exc:
                    for f in futures.values():
                        f.cancel()  # still queued: never computed
                    if isinstance(exc, EncodeCancelled):
                        raise
                    raise TimeoutError(
                        f"the vision tower is busy: images not encoded within {timeout_s:.0f}s"
                    ) from None
                if keys[i]:
                    self.cache.put(keys[i], CachedRows(tuple(grids[i]), e.clone(), d.clone()))
            embeds.append(e)
            deepstack.append(d)
        t2 = time.perf_counter()
        H, nds = self.hidden_size, self.cfg.n_deepstack
        dtype = self.vision.merger.linear_fc2.weight.dtype
        return EncodedPrompt(
            fill_ids=torch.tensor(ids, dtype=torch.int32),
            positions=positions.to(torch.int32),
            mrope_delta=delta,
            embeds=torch.cat(embeds) if embeds else torch.empty(0, H, dtype=dtype),
            deepstack=torch.cat(deepstack) if deepstack else torch.empty(0, nds * H, dtype=dtype),
            num_images=len(images),
            cache_hits=len(images) - len(misses),
            timings={"preprocess_s": t1 - t0, "vision_s": t2 - t1},
        )

    def close(self) -> None:
        self.batcher.close()


def _rows(future: Future, timeout_s: float | None, cancelled: threading.Event | None):
    """The future's result; TimeoutError after `timeout_s`, EncodeCancelled once `cancelled` is set."""
    if cancelled is None:
        return future.result(timeout=timeout_s)
    end = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        step = CANCEL_CHECK_S if end is None else max(0.0, min(CANCEL_CHECK_S, end - time.monotonic()))
        try:
            return future.result(timeout=step)
        except TimeoutError:
            if cancelled.is_set():
                raise EncodeCancelled("the request was given up while its images waited") from None
            if end is not None and time.monotonic() >= end:
                raise
