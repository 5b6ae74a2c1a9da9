"""A stand-in language server for router tests: the same HTTP surface as ours (`/v1/chat/completions`
with streaming, `/v1/models`, `/health`, `/ready`, 404 for an unknown model name) and no model.

It answers with its own name, so a test can see which server a request went to. It also serves
`/server_info`, the one route sglang-router reads to learn the model name. Run as a script:
`python fake_language_server.py --port N --name w0 [--model tiny]`.
"""

from __future__ import annotations

import argparse
import json

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def build_app(name: str, model: str) -> FastAPI:
    app = FastAPI()
    app.state.served = 0

    def reply(delta_or_message: str, finish: str | None, chunk: bool) -> dict:
        body = {"role": "assistant", "content": delta_or_message}
        choice = {"index": 0, "finish_reason": finish, "logprobs": None}
        choice["delta" if chunk else "message"] = body
        obj = "chat.completion.chunk" if chunk else "chat.completion"
        return {"id": f"chatcmpl-{name}", "object": obj, "created": 0, "model": model, "choices": [choice]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body.get("model") != model:
            err = {"message": f"model {body.get('model')!r} does not exist", "type": "invalid_request_error"}
            return JSONResponse({"error": err}, status_code=404)
        app.state.served += 1
        if not body.get("stream"):
            out = reply(name, "stop", chunk=False)
            out["usage"] = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
            return out

        async def events():
            yield f"data: {json.dumps(reply(name, None, chunk=True))}\n\n"
            yield f"data: {json.dumps(reply('', 'stop', chunk=True))}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "created": 0, "owned_by": "x"}]}

    @app.get("/server_info")
    async def server_info() -> dict:
        return {"served_model_name": model, "model_path": f"/models/{model}"}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> dict:
        return {"ready": True, "served": app.state.served}

    return app


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--model", default="tiny")
    a = p.parse_args()
    uvicorn.run(build_app(a.name, a.model), host=a.host, port=a.port, log_level="warning")
