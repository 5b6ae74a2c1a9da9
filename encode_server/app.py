"""HTTP face of the encode server: POST /v1/encode (msgpack), GET /health, /ready, /metrics."""

from __future__ import annotations

import asyncio
import logging
import threading

import anyio
import httpx
import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from encode_server.config import EncodeSettings
from encode_server.metrics import EncodeMetrics
from encode_server.protocol import CONTENT_TYPE, EncodeResponse, decode_request, encode
from encode_server.service import EncodeService
from transfer.heap import keep_freed_heap

log = logging.getLogger(__name__)
STATUS_CODES = {
    "ok": 200,
    "bad_request": 400,
    "overloaded": 503,
    "transfer_failed": 502,
    "error": 500,
    "cancelled": 499,
}


def build_app(settings: EncodeSettings) -> FastAPI:
    keep_freed_heap(settings.malloc_keep_freed_bytes)
    metrics = EncodeMetrics()
    service = EncodeService(settings, metrics)
    limiter = anyio.CapacityLimiter(settings.max_concurrent_requests)
    app = FastAPI(title="deepsplit encode server")
    app.state.service = service

    def reply(resp: EncodeResponse) -> Response:
        return Response(encode(resp), status_code=STATUS_CODES[resp.status], media_type=CONTENT_TYPE)

    @app.post("/v1/encode")
    async def encode_endpoint(request: Request) -> Response:
        body = await request.body()
        try:
            req = decode_request(body)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            log.warning("rejected malformed encode request: %s", e)
            metrics.requests.labels("malformed").inc()
            return reply(
                EncodeResponse(room="", status="bad_request", message=f"malformed encode request: {e}")
            )
        if not service.try_acquire():
            metrics.requests.labels("overloaded").inc()
            service.sender.abandon(req.descriptor, "encoder: overloaded: at capacity")
            return reply(
                EncodeResponse(room=req.room, status="overloaded", message="encode server is at capacity")
            )
        cancelled = threading.Event()  # the caller went away: its queued images are dropped
        watch = asyncio.ensure_future(_set_when_gone(request, cancelled))
        try:
            resp = await anyio.to_thread.run_sync(service.handle, req, cancelled, limiter=limiter)
        finally:
            watch.cancel()
            service.release()
        return reply(resp)

    @app.get("/health")
    async def health() -> Response:
        try:
            took = await anyio.to_thread.run_sync(service.health_probe)
        except Exception as e:  # noqa: BLE001
            return JSONResponse({"status": "unhealthy", "error": str(e)}, status_code=503)
        return JSONResponse({"status": "ok", "probe_s": round(took, 4), "inflight": service.inflight})

    @app.get("/ready")
    async def ready() -> dict:
        return {"status": "ready", "inflight": service.inflight}

    @app.get("/metrics")
    async def prom() -> Response:
        metrics.refresh(service)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.router.on_shutdown.append(service.close)
    if settings.register_with:
        announcer = Announcer(settings)
        app.router.on_startup.append(announcer.start)
        app.router.on_shutdown.insert(0, announcer.stop)
    return app


async def _set_when_gone(request: Request, cancelled: threading.Event) -> None:
    """Set `cancelled` once the client of `request` disconnects (the language server gave it up)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    cancelled.set()


class Announcer:
    """Registers this encoder with each `register_with` language server and renews it every ttl/3."""

    def __init__(self, settings: EncodeSettings) -> None:
        self.s = settings
        self.url = settings.advertise_url or f"http://{settings.host}:{settings.port}"
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        from language_server.mm.discovery import register_with

        failing: set[str] = set()
        async with httpx.AsyncClient(timeout=5.0) as client:
            while True:
                for lang in self.s.register_with:
                    try:
                        await register_with(
                            client, lang, self.url, self.s.register_ttl_s, self.s.register_api_key
                        )
                        if lang in failing:
                            log.info("registered with %s again", lang)
                        failing.discard(lang)
                    except (httpx.HTTPError, ValueError, KeyError) as e:
                        if lang not in failing:
                            log.warning("cannot register with %s: %s (retrying)", lang, e)
                        failing.add(lang)
                await asyncio.sleep(self.s.register_ttl_s / 3)

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        async with httpx.AsyncClient(timeout=2.0) as client:
            for lang in self.s.register_with:
                headers = (
                    {"authorization": f"Bearer {self.s.register_api_key}"} if self.s.register_api_key else {}
                )
                try:
                    await client.post(
                        f"{lang.rstrip('/')}/v1/encoders/unregister", json={"url": self.url}, headers=headers
                    )
                except httpx.HTTPError:
                    pass
