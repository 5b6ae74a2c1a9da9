"""HTTP face of the encode server: POST /v1/encode (msgpack), GET /health, /ready, /metrics."""

from __future__ import annotations

import logging

import anyio
import msgspec
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from encode_server.config import EncodeSettings
from encode_server.metrics import EncodeMetrics
from encode_server.protocol import CONTENT_TYPE, EncodeResponse, decode_request, encode
from encode_server.service import EncodeService

log = logging.getLogger(__name__)
STATUS_CODES = {"ok": 200, "bad_request": 400, "overloaded": 503, "error": 500}


def build_app(settings: EncodeSettings) -> FastAPI:
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
            return reply(
                EncodeResponse(room=req.room, status="overloaded", message="encode server is at capacity")
            )
        try:
            resp = await anyio.to_thread.run_sync(service.handle, req, limiter=limiter)
        finally:
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
    return app
