"""One encode request end to end: decode images, encode (cache + batched vision), push rows, report.

With `claim_ahead` the room is claimed as soon as the prompt's row count is known, so the transfer
handshake travels while the vision tower runs; every exit that will not write abandons the room
(its blocks free now).

`EncodeService.handle(req, cancelled)` never raises for a bad request: it returns an
`EncodeResponse` whose status says what happened (`bad_request` with the reason for unusable input,
`error` for a failed transfer, `cancelled` when the caller went away: `cancelled` was set while the
images waited, or before the rows went out). It is synchronous; the HTTP layer runs it in a worker
thread and sets `cancelled` when the client disconnects.
"""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
from PIL import Image

from deepsplit.images import BadImage, ImageLimits, image_urls, load_image
from encode_server.config import EncodeSettings
from encode_server.encoder import EncodeCancelled, Encoder
from encode_server.metrics import EncodeMetrics
from encode_server.protocol import EncodeRequest, EncodeResponse

log = logging.getLogger(__name__)


class EncodeService:
    def __init__(self, settings: EncodeSettings, metrics: EncodeMetrics) -> None:
        from transfer import SenderSettings, TransferSender

        self.settings = settings
        self.metrics = metrics
        self.encoder = Encoder(
            settings.model,
            settings.max_batch_patches,
            settings.cache_bytes,
            settings.dtype,
            settings.max_pixels,
        )
        self.sender = TransferSender(
            SenderSettings(
                host=settings.transfer_host,
                mooncake_protocol=settings.mooncake_protocol,
                mooncake_device=settings.mooncake_device,
                mooncake_write_pieces=settings.mooncake_write_pieces,
                mooncake_min_piece_bytes=settings.mooncake_min_piece_bytes,
                mooncake_write_retries=settings.mooncake_write_retries,
                link_timeout_s=settings.link_timeout_s,
            )
        )
        self.limits = ImageLimits(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            allow_http=settings.allow_http_images,
        )
        self._inflight = 0
        self._lock = threading.Lock()

    def try_acquire(self) -> bool:
        with self._lock:
            if self._inflight >= self.settings.max_concurrent_requests:
                return False
            self._inflight += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._inflight -= 1

    @property
    def inflight(self) -> int:
        return self._inflight

    def handle(self, req: EncodeRequest, cancelled: threading.Event | None = None) -> EncodeResponse:
        t0 = time.perf_counter()
        try:
            urls = image_urls(req.messages)
            if len(urls) > self.settings.max_images_per_request:
                raise BadImage(
                    f"{len(urls)} images in one request; the limit is {self.settings.max_images_per_request}"
                )
            loaded = [load_image(u, self.limits) for u in urls]
            encoded = self.encoder.encode(
                req.messages,
                [img for img, _ in loaded],
                [b for _, b in loaded],
                timeout_s=req.deadline_s,
                on_rows=self._claim(req),
                cancelled=cancelled,
            )
            if cancelled is not None and cancelled.is_set():
                raise EncodeCancelled("the request was given up before its rows went out")
        except EncodeCancelled as e:
            return self._refuse(req, "cancelled", str(e))
        except TimeoutError as e:  # queued behind other work: another encoder may be free
            return self._refuse(req, "overloaded", str(e))
        except BadImage as e:
            return self._refuse(req, "bad_request", str(e))
        except (ValueError, TypeError) as e:  # e.g. image processor refusing an extreme shape
            return self._refuse(req, "bad_request", f"image rejected: {e}")
        except Exception as e:  # noqa: BLE001
            log.exception("encode failed for room %s", req.room)
            return self._refuse(req, "error", f"encode failed: {e}")
        t1 = time.perf_counter()
        try:
            left = max(0.1, req.deadline_s - (t1 - t0))
            self.sender.send(req.descriptor, self._payload(encoded), deadline_s=left)
        except Exception as e:  # noqa: BLE001 - TransferFailed, a bad descriptor, a dead peer
            log.warning("transfer of room %s failed: %s", req.room, e)
            self.metrics.requests.labels("transfer_failed").inc()
            return EncodeResponse(room=req.room, status="transfer_failed", message=f"transfer failed: {e}")
        t2 = time.perf_counter()
        self.metrics.observe(encoded, t1 - t0, t2 - t0)
        return EncodeResponse(
            room=req.room,
            status="ok",
            num_rows=int(encoded.fill_ids.numel()),
            num_vision_rows=int(encoded.embeds.shape[0]),
            num_images=encoded.num_images,
            cache_hits=encoded.cache_hits,
            encode_s=t1 - t0,
            total_s=t2 - t0,
        )

    def _claim(self, req: EncodeRequest):
        """The `on_rows` hook: claim the room ahead of the rows when configured (Mooncake only)."""
        if not self.settings.claim_ahead:
            return None
        return lambda n: self.sender.claim(req.descriptor, n, req.deadline_s)

    def _refuse(self, req: EncodeRequest, status: str, message: str) -> EncodeResponse:
        """No rows will come: free the receiver's room now (its blocks need not wait for a write)."""
        self.metrics.requests.labels(status).inc()
        self.sender.abandon(req.descriptor, f"encoder: {status}: {message}")
        return EncodeResponse(room=req.room, status=status, message=message)

    def _payload(self, e):
        from transfer import MultimodalPayload

        return MultimodalPayload(
            fill_ids=e.fill_ids,
            mrope=e.positions,
            embeddings=e.embeds,
            deepstack=e.deepstack,
            mrope_delta=e.mrope_delta,
            num_images=e.num_images,
        )

    def health_probe(self) -> float:
        """A real (uncached) encode of a small image; returns its duration in seconds. While the
        vision tower is busy or ran a forward within `health_progress_s`, that work is the proof of health (a probe
        queued behind minutes of images would make a busy encoder look dead)."""
        b = self.encoder.batcher
        recent = time.monotonic() - b.last_progress < self.settings.health_progress_s
        if b.alive and (b.busy or recent):  # computing now, or a forward finished lately: proof enough
            return 0.0
        t = time.perf_counter()
        img = Image.fromarray(np.full((32, 32, 3), 127, dtype=np.uint8))
        pixels, grid = self.encoder.pre.images_to_patches([img])
        self.encoder.batcher.submit(pixels, grid[0]).result(timeout=self.settings.health_progress_s)
        return time.perf_counter() - t

    def close(self) -> None:
        self.encoder.close()
        self.sender.close()
