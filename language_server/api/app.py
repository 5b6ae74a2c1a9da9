"""The FastAPI app: routes, API-key check, body-size limit, JSON parsing and error rendering.

Endpoint logic is in `serving.py`; building the engine and provider is `language_server.server`.
"""

from __future__ import annotations

import json

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from language_server.api import protocol as P
from language_server.api.errors import APIError, bad_request, from_validation
from language_server.api.serving import Serving


def build_app(serving: Serving, settings, debug_info=None) -> FastAPI:
    app = FastAPI(title="deepsplit language server", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        serving.metrics.errors.labels(str(e.status), e.code or "").inc()
        return e.response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        serving.metrics.errors.labels("500", "internal").inc()
        return APIError(500, f"internal error: {type(e).__name__}: {e}", type_="server_error").response()

    async def check_key(request: Request) -> None:
        """A dependency rather than middleware: BaseHTTPMiddleware interferes with streaming."""
        if settings.api_key and request.headers.get("authorization", "") != f"Bearer {settings.api_key}":
            raise APIError(
                401, "missing or invalid API key (Authorization: Bearer ...)", code="invalid_api_key"
            )

    v1 = [Depends(check_key)]

    async def read_json(request: Request, model: type) -> object:
        limit = settings.max_request_bytes
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise APIError(
                413, f"request body of {length} bytes exceeds the limit of {limit}", code="too_large"
            )
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="too_large")
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(data, dict):
            raise bad_request("request body must be a JSON object", code="invalid_json")
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise from_validation(e) from None

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat(request: Request):
        return await serving.chat(request, await read_json(request, P.ChatCompletionRequest))

    @app.post("/v1/completions", dependencies=v1)
    async def completions(request: Request):
        return await serving.completion(request, await read_json(request, P.CompletionRequest))

    def model_card() -> dict:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": 0,
            "owned_by": "deepsplit",
            "max_model_len": serving.max_model_len,
        }

    @app.get("/v1/models", dependencies=v1)
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=v1)
    async def model(model: str) -> dict:
        serving.check_name(model)
        return model_card()

    @app.post("/tokenize", dependencies=v1)
    async def tokenize(request: Request) -> dict:
        """vLLM's: the token ids of a prompt, or of a chat rendered with the chat template (an image
        part counts as its one pad token there; the real prompt expands it to the image's rows)."""
        return serving.tokenize(await read_json(request, P.TokenizeRequest))

    @app.post("/detokenize", dependencies=v1)
    async def detokenize(request: Request) -> dict:
        return serving.detokenize(await read_json(request, P.DetokenizeRequest))

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = serving.engine.alive
        return JSONResponse({"status": "ok" if ok else "engine dead"}, status_code=200 if ok else 503)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        ok = serving.engine.alive
        return JSONResponse({"ready": ok, **serving.engine.stats()}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(serving.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/server_info")
    async def server_info() -> dict:
        """What routers (sglang-router) read to label this worker."""
        return {
            "served_model_name": settings.model_name,
            "model_path": settings.model,
            "mode": settings.mode,
            "max_model_len": serving.max_model_len,
        }

    @app.get("/model_info")
    async def model_info() -> dict:
        return {
            "model_path": settings.model,
            "is_generation": True,
            "model_type": "qwen3_vl_moe",
            "architectures": ["Qwen3VLMoeForConditionalGeneration"],
        }

    provider = serving.provider
    registry = getattr(provider, "registry", None)
    if registry is not None:
        from language_server.mm.discovery import registration_router

        app.include_router(registration_router(registry, dependencies=v1))
    if hasattr(provider, "start"):  # disaggregated: discovery and health probes from the start
        app.router.on_startup.append(provider._ensure_started)

    if settings.debug_endpoints:

        @app.get("/debug/engine")
        async def debug() -> dict:
            extra = provider.debug() if hasattr(provider, "debug") else {}
            return {**serving.engine.stats(), **extra, **(debug_info() if debug_info else {})}

    return app
