"""The other process of each transfer-benchmark pair (spawned; commands and timings over a pipe).

`ours_sender`: a real `TransferSender` that pushes a payload of the asked size into the room it is
given and reports how long `send` took (handshake, writes, Done/Ack included) and when it began;
with `claim_ahead_s` it first claims the room and waits that long, as an encoder claims a room
while its vision tower runs. `raw_mooncake_target`
registers a plain buffer for Mooncake writes; `raw_zmq_sink` PULLs frames (optionally copying each
into a preallocated buffer) and acks each message.
"""

from __future__ import annotations

import time

import torch

HIDDEN, DEEPSTACK = 2048, 3
ROW_BYTES = HIDDEN * 4 * (1 + DEEPSTACK) + 16  # fp32 vision + deepstack + id + 3 positions


def rows_for(nbytes: int) -> int:
    return max(1, -(-nbytes // ROW_BYTES))


def payload(rows: int):
    from transfer import MultimodalPayload

    return MultimodalPayload(
        fill_ids=torch.arange(rows, dtype=torch.int32),
        mrope=torch.arange(3 * rows, dtype=torch.int32).view(3, rows),
        embeddings=torch.randn(rows, HIDDEN),
        deepstack=torch.randn(rows, DEEPSTACK * HIDDEN),
        mrope_delta=0,
    )


def ours_sender(conn) -> None:
    from transfer import TransferSender

    sender = TransferSender()
    cache: dict[int, object] = {}
    while (cmd := conn.recv()) is not None:
        desc, rows, claim_ahead_s = cmd
        if rows not in cache:
            cache.clear()
            cache[rows] = payload(rows)
        if claim_ahead_s is not None:
            sender.claim(desc, rows)
            time.sleep(claim_ahead_s)
        r = sender.send(desc, cache[rows])
        conn.send((r.seconds, r.started_at))
    sender.close()


def raw_mooncake_target(conn, nbytes: int) -> None:
    from transfer.backends.mooncake_backend import _engine

    eng = _engine("127.0.0.1", "tcp", "")
    buf = torch.empty(nbytes, dtype=torch.uint8)
    assert eng.register_memory(buf.data_ptr(), nbytes) == 0
    conn.send((f"127.0.0.1:{eng.get_rpc_port()}", buf.data_ptr()))
    conn.recv()  # until the writer is done


def raw_zmq_sink(conn, into_bytes: int = 0) -> None:
    """Acks every message; with `into_bytes` it first copies the frame into a preallocated buffer of
    that size (`recv_into`), as any receiver that keeps rows in a registered pool must with ZMQ."""
    import zmq

    ctx = zmq.Context()
    pull, ack = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    conn.send(port)
    ack.connect(conn.recv())
    pool = torch.empty(into_bytes, dtype=torch.uint8).numpy() if into_bytes else None
    while True:
        if pool is not None:
            if pull.recv_into(pool) == 0:
                break
        elif len(pull.recv(copy=False)) == 0:
            break
        ack.send(b"k")
    ctx.destroy(0)


def zmq_wire_floor_sink(conn, pool_bytes: int) -> None:
    """The receiving half of the smallest Python exchange with our ZMQ wire shape: a ROUTER takes
    [peer, msgpack header with (offset, bytes) segments and a crc, one frame per segment], receives
    each frame into a preallocated pool at its offset, checks the crc of the first two segments (ids
    and positions) and answers a msgpack ack. No room table, claims, ownership checks or seal."""
    import zlib

    import msgspec
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    conn.send(sock.bind_to_random_port("tcp://127.0.0.1"))
    pool = torch.empty(pool_bytes, dtype=torch.uint8).numpy()
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()
    while True:
        peer, head = sock.recv(), dec.decode(sock.recv())
        if head is None:
            break
        for offset, n in head["segments"]:
            sock.recv_into(pool[offset : offset + n])
        (a, n0), (_, n1) = head["segments"][:2]
        ok = zlib.crc32(pool[a : a + n0 + n1]) == head["crc"]
        sock.send_multipart([peer, enc.encode({"room": head["room"], "ok": ok})])
    ctx.destroy(0)
