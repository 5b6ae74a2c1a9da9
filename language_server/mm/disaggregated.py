"""Disaggregated provider: encode servers compute the vision rows and push them into our buffers.

Per request: open a room in the `TransferReceiver` (blocks for `mm_initial_rows`; the encoder
resumes for more), send the messages + room descriptor to the least-loaded healthy encoder
(`EncoderPool`, bounded retry with a fresh room per attempt), then hand the filled rows to the
engine as `MultimodalInputs` whose `on_consumed` frees the blocks. A failed, timed-out or cancelled
attempt always aborts its room. Encoders come from static URLs, DNS and registration (`discovery`).
"""

from __future__ import annotations

import asyncio
import logging
import time

from deepsplit.images import ImageLimits
from encode_server.protocol import EncodeRequest
from language_server.config import LanguageSettings
from language_server.mm.base import (
    BadMultimodalInput,
    EncoderUnavailable,
    MultimodalInputs,
    MultimodalProvider,
)
from language_server.mm.discovery import EncoderDiscovery, EncoderRegistry
from language_server.mm.encoder_pool import EncodeRejected, EncoderPool

log = logging.getLogger(__name__)
_SCHEMES = ("data:", "http://", "https://")


class DisaggregatedProvider(MultimodalProvider):
    def __init__(self, settings: LanguageSettings, limits: ImageLimits) -> None:
        from deepsplit.model.config import ModelConfig
        from transfer import BufferSpec, ReceiverSettings, TransferReceiver

        if not (settings.encoder_urls or settings.encoder_dns or settings.allow_encoder_registration):
            raise ValueError(
                "disaggregated mode needs encoders: --encoder-urls, --encoder-dns or "
                "--allow-encoder-registration"
            )
        cfg = ModelConfig.from_dir(settings.model)
        self.s, self.limits = settings, limits
        spec = BufferSpec.for_budget(
            cfg.text.hidden_size,
            cfg.n_deepstack,
            settings.dtype or cfg.dtype,
            settings.mm_block_size,
            settings.mm_buffer_bytes,
        )
        self.receiver = TransferReceiver(
            spec,
            ReceiverSettings(
                backend=settings.backend,
                host=settings.transfer_host,
                control_port=settings.transfer_port,
                mooncake_protocol=settings.mooncake_protocol,
                mooncake_device=settings.mooncake_device,
                room_ttl_s=settings.transfer_ttl_s,
                stale_write_guard_s=settings.transfer_stale_write_guard_s,
                grow_on_begin=settings.mm_grow_on_begin,
                keep_freed_heap_bytes=settings.malloc_keep_freed_bytes,
            ),
        )
        self.pool = EncoderPool(
            settings.encoder_urls,
            timeout_s=settings.encode_timeout_s,
            health_interval_s=settings.encoder_health_interval_s,
            max_attempts=settings.encode_attempts,
            probe_timeout_s=settings.encoder_probe_timeout_s,
            link_timeout_s=settings.encoder_link_timeout_s,
            stalled_probes=settings.encoder_stalled_probes,
        )
        self.registry = EncoderRegistry() if settings.allow_encoder_registration else None
        self.discovery = EncoderDiscovery(
            self.pool.set_urls,
            static_urls=settings.encoder_urls,
            dns_names=settings.encoder_dns,
            dns_interval_s=settings.dns_interval_s,
            registry=self.registry,
        )
        self._started: asyncio.Task | None = None

    async def start(self) -> None:
        await self.discovery.start()
        await self.pool.start()

    async def _ensure_started(self) -> None:
        if self._started is None:
            self._started = asyncio.ensure_future(self.start())
        await asyncio.shield(self._started)

    def _check_urls(self, images: list[str]) -> None:
        for i, url in enumerate(images):
            if not isinstance(url, str) or not url.startswith(_SCHEMES):
                raise BadMultimodalInput(f"image {i}: unsupported image URL scheme (use data: or http(s):)")
            if url.startswith("http") and not self.limits.allow_http:
                raise BadMultimodalInput(f"image {i}: http(s) image URLs are disabled on this server")

    async def prepare(self, request_id: str, messages: list[dict], images: list[str]) -> MultimodalInputs:
        from transfer import PoolExhausted, RoomFailed, descriptor_to_builtins

        self._check_urls(images)
        await self._ensure_started()
        rooms: list[str] = []
        deadline = time.monotonic() + self.s.encode_timeout_s

        async def make_request(attempt: int) -> EncodeRequest:
            left = max(0.1, deadline - time.monotonic())
            desc = await asyncio.to_thread(
                self.receiver.open_room, self.s.mm_initial_rows, f"{request_id}.{attempt}", min(left, 10.0)
            )
            rooms.append(desc.room)
            return EncodeRequest(
                room=desc.room,
                messages=messages,
                descriptor=descriptor_to_builtins(desc),
                deadline_s=min(left, self.s.transfer_ttl_s),
            )

        async def on_failed(req: EncodeRequest, writer_gone: bool) -> None:
            self.receiver.abort(req.room, "encode attempt failed", writer_gone=writer_gone)

        ok, answered = False, ""
        try:
            resp = await self.pool.encode(make_request, on_failed)
            answered = resp.room  # the encoder replied: its sender is done with that room
            room = await asyncio.wait_for(asyncio.wrap_future(self.receiver.future(resp.room)), 5.0)
            inputs = MultimodalInputs(
                fill_ids=room.fill_ids.long(),
                positions=room.positions.long(),
                mrope_delta=room.mrope_delta,
                embeddings=room.embeddings,
                deepstack=room.deepstack,
                on_consumed=room.release,
            )
            ok = True
            return inputs
        except EncodeRejected as e:
            raise BadMultimodalInput(str(e)) from None
        except PoolExhausted as e:
            raise EncoderUnavailable(f"receive buffers are full: {e}") from None
        except (RoomFailed, TimeoutError) as e:
            raise EncoderUnavailable(f"image rows did not arrive: {e}") from None
        finally:  # every room but the one handed out goes back (no-op for rooms already failed)
            for r in rooms if not ok else rooms[:-1]:
                why = "request failed or cancelled" if not ok else "superseded attempt"
                self.receiver.abort(r, why, writer_gone=r == answered)

    def buffer_usage(self) -> tuple[int, int] | None:
        st = self.receiver.stats()
        return st["blocks_used"], st["blocks_total"]

    def debug(self) -> dict:
        return {"encoders": self.pool.snapshot(), "transfer": self.receiver.stats()}

    async def close(self) -> None:
        await self.discovery.close()
        await self.pool.close()
        self.receiver.close()
