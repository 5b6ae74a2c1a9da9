"""Monolithic provider: the vision tower runs in this process (the fidelity baseline).

Images are decoded with the shared safety limits (`deepsplit.images`), then `encode_server`'s
transport-free `Encoder` renders the prompt and runs the vision tower in its batching worker thread,
so the images of concurrently waiting requests share one forward. Nothing here touches the KV cache.
"""

from __future__ import annotations

import asyncio

from deepsplit.images import BadImage, ImageLimits, load_image
from language_server.mm.base import (
    BadMultimodalInput,
    EncoderUnavailable,
    MultimodalInputs,
    MultimodalProvider,
)


class MonolithicProvider(MultimodalProvider):
    def __init__(
        self,
        model_dir: str,
        limits: ImageLimits,
        dtype: str | None = None,
        max_pixels: int | None = None,
        max_batch_patches: int = 16384,
        cache_bytes: int = 0,
        timeout_s: float = 120.0,
    ) -> None:
        from encode_server.encoder import Encoder

        self.limits = limits
        self.timeout_s = timeout_s
        self.encoder = Encoder(
            model_dir,
            max_batch_patches=max_batch_patches,
            cache_bytes=cache_bytes,
            dtype=dtype,
            max_pixels=max_pixels,
        )

    async def prepare(self, request_id: str, messages: list[dict], images: list[str]) -> MultimodalInputs:
        return await asyncio.to_thread(self._prepare, messages, images)

    def _prepare(self, messages: list[dict], images: list[str]) -> MultimodalInputs:
        decoded, raw = [], []
        for i, url in enumerate(images):
            try:
                img, data = load_image(url, self.limits)
            except BadImage as e:
                raise BadMultimodalInput(f"image {i}: {e}") from None
            decoded.append(img)
            raw.append(data)
        try:
            enc = self.encoder.encode(messages, decoded, raw, timeout_s=self.timeout_s)
        except TimeoutError as e:
            raise EncoderUnavailable(f"vision tower timed out after {self.timeout_s}s") from e
        except ValueError as e:  # template/placeholder mismatch, processor rejection
            raise BadMultimodalInput(str(e)) from None
        return MultimodalInputs(
            fill_ids=enc.fill_ids.long(),
            positions=enc.positions.long(),
            mrope_delta=enc.mrope_delta,
            embeddings=enc.embeds,
            deepstack=enc.deepstack,
        )

    async def close(self) -> None:
        self.encoder.close()
