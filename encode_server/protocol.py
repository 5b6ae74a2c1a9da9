"""Control messages between a language server and an encode server (msgpack over HTTP, never pickle).

The language server POSTs an `EncodeRequest` to `/v1/encode`; the encode server answers with an
`EncodeResponse` once the rows are in the language node's blocks (or says why not). Tensors never
travel here: the request carries the destination descriptor, the bytes go through `transfer/`.
"""

from __future__ import annotations

from typing import Any

import msgspec

PROTOCOL_VERSION = 1
CONTENT_TYPE = "application/msgpack"


class EncodeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    version: int = PROTOCOL_VERSION
    room: str
    messages: list[dict[str, Any]]  # OpenAI chat messages; images as image_url parts
    descriptor: dict[str, Any]  # transfer.RoomDescriptor as a plain mapping
    deadline_s: float = 30.0


class EncodeResponse(msgspec.Struct, kw_only=True):
    room: str
    status: str  # "ok" | "bad_request" | "overloaded" | "transfer_failed" | "error" | "cancelled"
    message: str = ""
    num_rows: int = 0
    num_vision_rows: int = 0
    num_images: int = 0
    cache_hits: int = 0
    encode_s: float = 0.0  # request received -> rows computed
    total_s: float = 0.0  # request received -> rows written


_req_decoder = msgspec.msgpack.Decoder(EncodeRequest)
_resp_decoder = msgspec.msgpack.Decoder(EncodeResponse)
encode = msgspec.msgpack.encode


def decode_request(data: bytes) -> EncodeRequest:
    req = _req_decoder.decode(data)
    if req.version != PROTOCOL_VERSION:
        raise msgspec.ValidationError(f"protocol version {req.version} != {PROTOCOL_VERSION}")
    return req


def decode_response(data: bytes) -> EncodeResponse:
    return _resp_decoder.decode(data)
