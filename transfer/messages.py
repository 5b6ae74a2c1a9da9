"""Typed control messages between a sender (encoder) and a receiver (language node), as msgpack.

Every message is a small tagged msgspec struct carrying its protocol version; tensors never travel
here (ZMQ data frames follow a `Data` header as raw bytes; Mooncake writes bypass this entirely).
`decode` validates type, fields and version and raises `BadMessage` with a reason — callers log it
and keep serving. Never pickle.
"""

from __future__ import annotations

import msgspec

VERSION = 2  # 2: Data may claim and seal the room (ZMQ fast path, no separate Begin/Done)


class BadMessage(ValueError):
    """A control message that does not decode, validate, or match our protocol version."""


class _Msg(msgspec.Struct, tag_field="t", kw_only=True, forbid_unknown_fields=True):
    v: int = VERSION
    room: str


class BufferAddr(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    addr: int  # base address of the registered region (Mooncake); 0 for zmq
    row_bytes: int  # bytes per row (aux: per block)


class RoomDescriptor(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """All a sender needs to write a request's rows into the receiver's blocks."""

    v: int = VERSION
    room: str
    receiver_id: str  # the receiving process; a restarted receiver has a new one
    backend: str  # "mooncake" | "zmq"
    control: str  # tcp://host:port of the receiver's control socket
    session: str = ""  # Mooncake target "host:rpc_port"
    block_ids: list[int]
    block_size: int
    hidden: int
    num_deepstack: int
    dtype: str
    buffers: dict[str, BufferAddr]  # embeddings, fill_ids, mrope, deepstack, aux
    ttl_s: float  # the room fails this long after it was opened
    checksum: str = "meta"  # meta | full (see payload.checksum)


class Begin(_Msg, tag="begin"):
    """Sender -> receiver, first message of a room: the handshake (right receiver, room still open)."""

    receiver_id: str
    total_rows: int


class Ready(_Msg, tag="ready"):
    """Receiver -> sender: write. `block_ids` may have grown if Begin announced more rows."""

    block_ids: list[int]


class Partial(_Msg, tag="partial"):
    """Sender -> receiver: rows [0, sent_rows) written; `total_rows` needed; please allocate the rest."""

    total_rows: int
    sent_rows: int


class Resume(_Msg, tag="resume"):
    """Receiver -> sender: the room now owns `block_ids` (old + new); continue from `sent_rows`."""

    block_ids: list[int]
    sent_rows: int


class Done(_Msg, tag="done"):
    """Sender -> receiver: every row and the aux record are written."""

    total_rows: int
    vision_rows: int
    mrope_delta: int
    num_images: int
    checksum: int


class Data(_Msg, tag="data"):
    """Sender -> receiver (zmq backend): frame i after this header holds segments[i] =
    (buffer, byte offset into the buffer's region, nbytes).

    Fast path (the rows fit the descriptor's blocks): the first Data of a room also claims it
    (`receiver_id`, `total_rows`, as Begin would) and the last carries the `done` seal, so a whole
    room is one message and its Ack. Each buffer's rows come in request order (the receiver
    refuses a frame that skips or repeats rows, and a seal over rows that never came)."""

    segments: list[tuple[str, int, int]]
    receiver_id: str = ""  # set: this message claims the room (no Begin was sent)
    total_rows: int = 0
    done: Done | None = None  # set: every row is in these frames or earlier ones


class Ack(_Msg, tag="ack"):
    """Receiver -> sender: the answer to Done (or a refusal of any earlier step when ok is False)."""

    ok: bool
    reason: str = ""


class Status(_Msg, tag="status"):
    """Sender -> receiver: "I sent all I had for this step and wait for `waiting` (ready | resume |
    ack), but my link dropped and came back since" (libzmq loses the message it was writing then,
    and a ROUTER drops what it queued for a peer that was away). The receiver sends that answer
    again, or fails the room if what it answers never arrived — instead of both sides waiting for
    the room's deadline. A receiver without it logs the message as undecodable and the room waits
    for its deadline, as before."""

    waiting: str


class Abort(_Msg, tag="abort"):
    """Either side: give up the room (sender failed, or receiver no longer wants it)."""

    reason: str


Message = Begin | Ready | Data | Partial | Resume | Done | Ack | Status | Abort
WAITS = ("ready", "resume", "ack")  # what a Status may say the sender waits for
_decoder = msgspec.msgpack.Decoder(Message)
_desc_decoder = msgspec.msgpack.Decoder(RoomDescriptor)
encode = msgspec.msgpack.encode


def decode(data: bytes) -> Message:
    try:
        msg = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BadMessage(f"undecodable control message ({len(data)} bytes): {e}") from None
    if msg.v != VERSION:
        raise BadMessage(f"protocol version {msg.v} != {VERSION} (room {msg.room!r})")
    if isinstance(msg, Status) and msg.waiting not in WAITS:
        raise BadMessage(f"status of room {msg.room!r} waits for {msg.waiting!r}, not one of {WAITS}")
    return msg


def descriptor_from_builtins(obj) -> RoomDescriptor:
    """A descriptor that travelled inside another message as a plain mapping."""
    try:
        d = msgspec.convert(obj, RoomDescriptor)
    except msgspec.ValidationError as e:
        raise BadMessage(f"bad room descriptor: {e}") from None
    if d.v != VERSION:
        raise BadMessage(f"descriptor version {d.v} != {VERSION}")
    return d


def descriptor_to_builtins(d: RoomDescriptor) -> dict:
    return msgspec.to_builtins(d)
