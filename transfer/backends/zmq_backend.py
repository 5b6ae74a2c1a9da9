"""ZMQ backend: rows travel as raw frames on the room's control connection, after a `Data` header.

On the fast path the first header also claims the room and the last carries the `Done` seal, so a
room that fits its blocks is one message per ~1 MiB of rows (a small remainder, such as the aux
record, rides with the message before it) and the receiver's Ack.

The sender hands large frames to ZMQ without copying; the receiver's control thread checks each
header against the room's blocks and receives the frame straight into them (`recv_into`), so a
frame for a finished or foreign room is dropped, never written.
"""

from __future__ import annotations

import zmq

from transfer import messages as m
from transfer.backends.base import ReceiverBackend, SenderBackend, Write

ZERO_COPY_MIN = 64 * 1024  # below this a copy is cheaper than zmq's zero-copy bookkeeping
# rows go in ~1 MiB messages, so the receiver's copy of one overlaps the next one's arrival; a message
# may exceed FRAME_BYTES by TAIL_BYTES, so a ~1 MiB room, seal included, is one message
FRAME_BYTES = 2**20
TAIL_BYTES = FRAME_BYTES // 4


class ZmqSender(SenderBackend):
    name = "zmq"
    writes_out_of_band = False

    def write(
        self, conn, desc, room: str, writes: list[Write], claim: int = 0, done=None, while_writing=None
    ) -> None:
        send_on_control(conn, desc, room, writes, claim, done)
        if while_writing is not None:
            while_writing()


def send_on_control(conn, desc, room: str, writes: list[Write], claim: int = 0, done=None) -> None:
    """Send `writes` as Data messages on the room's control connection: ~1 MiB messages of whole
    rows, the first claiming the room for `claim` rows if asked, the last carrying `done` (the seal).
    The ZMQ backend moves every row this way; out-of-band backends send their small rows so."""
    chunks = []  # (buffer, offset, bytes), each whole rows of at most ~FRAME_BYTES
    for w in writes:
        rb = desc.buffers[w.buffer].row_bytes
        step = max(rb, FRAME_BYTES // rb * rb)
        chunks += [(w.buffer, w.offset + a, w.src[a : a + step]) for a in range(0, len(w.src), step)]
    message, size, first = [], 0, True
    for chunk in chunks:  # a message ends before a chunk that would take it past FRAME + TAIL
        if message and size + len(chunk[2]) > FRAME_BYTES + TAIL_BYTES:
            _send(conn, desc, room, message, claim if first else 0, None)
            message, size, first = [], 0, False
        message.append(chunk)
        size += len(chunk[2])
    if message or done is not None:
        _send(conn, desc, room, message, claim if first else 0, done)


def _send(conn, desc, room: str, chunks: list, claim: int, done) -> None:
    """One multipart message: the Data header (claiming the room / sealing it if asked), then the
    chunks' bytes, large ones handed to ZMQ without a copy."""
    head = m.Data(room=room, segments=[(b, off, len(c)) for b, off, c in chunks], done=done)
    if claim:
        head.receiver_id, head.total_rows = desc.receiver_id, claim
    conn.sock.send(m.encode(head), zmq.SNDMORE if chunks else 0)
    for i, (_, _, c) in enumerate(chunks):
        more = zmq.SNDMORE if i + 1 < len(chunks) else 0
        conn.sock.send(memoryview(c), more, copy=len(c) < ZERO_COPY_MIN)


class ZmqReceiver(ReceiverBackend):
    name = "zmq"
    data_on_control = True

    def register(self, regions: dict[str, tuple[int, int]]) -> tuple[str, dict[str, int]]:
        return "", {n: 0 for n in regions}
