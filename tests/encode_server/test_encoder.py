"""Encode pipeline without transport: equals the in-process path, caches by content, batches requests."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from deepsplit.model.generate import encode_prompts
from encode_server.cache import CachedRows, EmbeddingCache
from encode_server.encoder import Encoder
from tests.encode_server.conftest import gated_tower


def _img(h, w, seed):
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _msgs(n):
    parts = [{"type": "image_url", "image_url": {"url": "x"}} for _ in range(n)]
    return [{"role": "user", "content": parts + [{"type": "text", "text": "What is this?"}]}]


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    enc = Encoder(str(tiny_model_dir), max_batch_patches=4096, cache_bytes=2**20)
    yield enc
    enc.close()


def test_encode_equals_reference_path(encoder):
    images = [_img(64, 96, 1), _img(48, 48, 2)]
    out = encoder.encode(_msgs(2), images, [b"a", b"b"])
    ref = encode_prompts(encoder.vision, encoder.cfg, [encoder.pre.prepare(_msgs(2), images)])[0]
    assert torch.equal(out.fill_ids.long(), ref.input_ids)
    assert torch.equal(out.positions.long(), ref.positions) and out.mrope_delta == ref.mrope_delta
    torch.testing.assert_close(out.embeds, ref.vision_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.deepstack, ref.deepstack, atol=1e-6, rtol=0)
    assert out.embeds.shape[0] == int((out.fill_ids == encoder.cfg.image_token_id).sum())


def test_cache_hit_gives_identical_rows(encoder):
    img = _img(80, 80, 7)
    first = encoder.encode(_msgs(1), [img], [b"same-bytes"])
    hits = encoder.cache.hits
    second = encoder.encode(_msgs(1), [img], [b"same-bytes"])
    assert second.cache_hits == 1 and encoder.cache.hits == hits + 1 and first.cache_hits == 0
    assert torch.equal(first.embeds, second.embeds) and torch.equal(first.deepstack, second.deepstack)


def test_waiting_images_run_in_one_forward(encoder):
    """Images queued while the tower is busy are encoded together, each equal to its solo result."""
    from encode_server.batcher import VisionBatcher

    gate = threading.Event()
    calls = []

    class Gated:
        merge_unit = encoder.vision.merge_unit

        def __call__(self, pixels, grid):
            calls.append(len(grid))
            gate.wait(10)
            return encoder.vision(pixels, grid)

    batcher = VisionBatcher(Gated(), max_batch_patches=10_000)
    try:
        imgs = [_img(64, 64, 100 + i) for i in range(6)]
        patches = [encoder.pre.images_to_patches([im]) for im in imgs]
        futures = [batcher.submit(p, g[0]) for p, g in patches]
        gate.set()
        rows = [f.result(timeout=30) for f in futures]
    finally:
        batcher.close()
    assert sum(calls) == 6 and len(calls) <= 2  # the first image alone, then the 5 that waited
    for (p, g), (e, d) in zip(patches, rows, strict=True):
        solo_e, solo_d = encoder.vision(p, torch.tensor(g))
        torch.testing.assert_close(e, solo_e, atol=1e-5, rtol=0)
        torch.testing.assert_close(d, solo_d, atol=1e-5, rtol=0)


def test_lru_cache_is_bounded_by_bytes():
    rows = CachedRows((1, 2, 2), torch.zeros(1, 256), torch.zeros(1, 768))  # 4 KiB
    cache = EmbeddingCache(max_bytes=10_000)
    for k in "abc":
        cache.put(k, rows)
    assert len(cache) == 2 and cache.evictions == 1 and cache.bytes <= 10_000
    assert cache.get("a") is None and cache.get("c") is rows


def test_busy_tower_skips_cancelled_work_and_reports_progress(encoder):
    """A request that timed out cancels its queued images (never computed); `busy`/`last_progress`
    let the health check vouch for a busy tower without queueing behind it."""
    from encode_server.batcher import VisionBatcher

    tower, gate, seen = gated_tower(encoder.vision)
    p, g = encoder.pre.images_to_patches([_img(64, 64, 7)])
    batcher = VisionBatcher(tower, max_batch_patches=p.shape[0])  # one image per forward
    try:
        first = batcher.submit(p, g[0])
        queued = batcher.submit(p, g[0])
        with pytest.raises(TimeoutError):
            queued.result(timeout=0.2)
        assert queued.cancel() and batcher.busy
        before = batcher.last_progress
        gate.set()
        first.result(timeout=30)
        last = batcher.submit(p, g[0]).result(timeout=30)
        assert len(seen) == 2 and last[0].shape[0] > 0  # the cancelled image was never computed
        assert batcher.last_progress > before and not batcher.busy
    finally:
        gate.set()
        batcher.close()
