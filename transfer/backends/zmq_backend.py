"""ZMQ backend: rows travel as raw frames on the room's control connection, after a `Data` header.

On the fast path the first header also claims the room and the last carries the `Done` seal, so a
room that fits its blocks is one message (plus more per ~8 MiB) and the receiver's Ack.

The sender hands large frames to ZMQ without copying; the receiver's control thread checks each
header against the room's blocks and receives the frame straight into them (`recv_into`), so a
frame for a finished or foreign room is dropped, never written.
"""

from __future__ import annotations

import zmq

from transfer import messages as m
from transfer.backends.base import ReceiverBackend, SenderBackend, Write

ZERO_COPY_MIN = 64 * 1024  # below this a copy is cheaper than zmq's zero-copy bookkeeping
FRAME_BYTES = 2**20  # small writes share a message; large ones span several, so receive and copy overlap


class ZmqSender(SenderBackend):
    name = "zmq"
    writes_out_of_band = False

    def write(self, conn, desc, room: str, writes: list[Write], claim: int = 0, done=None) -> None:
        segs, frames, size = [], [], 0
        first = True

        def flush(last: bool):
            nonlocal segs, frames, size, first
            if segs or last and done is not None:
                head = m.Data(room=room, segments=segs, done=done if last else None)
                if first and claim:
                    head.receiver_id, head.total_rows = desc.receiver_id, claim
                conn.sock.send(m.encode(head), zmq.SNDMORE if frames else 0)
                for i, f in enumerate(frames):
                    more = zmq.SNDMORE if i + 1 < len(frames) else 0
                    conn.sock.send(memoryview(f), more, copy=len(f) < ZERO_COPY_MIN)
                first = False
            segs, frames, size = [], [], 0

        for w in writes:
            data = w.src
            rb = desc.buffers[w.buffer].row_bytes
            step = max(rb, FRAME_BYTES // rb * rb)  # frames hold whole rows
            for a in range(0, len(data), step):
                chunk = data[a : a + step]
                segs.append((w.buffer, w.offset + a, len(chunk)))
                frames.append(chunk)
                size += len(chunk)
                if size >= FRAME_BYTES:  # one message per ~8 MiB: receive and copy overlap
                    flush(last=False)
        flush(last=True)


class ZmqReceiver(ReceiverBackend):
    name = "zmq"
    data_on_control = True

    def register(self, regions: dict[str, tuple[int, int]]) -> tuple[str, dict[str, int]]:
        return "", {n: 0 for n in regions}
