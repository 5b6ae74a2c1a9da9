"""ZMQ backend: rows travel as raw frames on the room's control connection, after a `Data` header.

The sender hands large frames to ZMQ without copying; the receiver's control thread checks each
header against the room's blocks and receives the frame straight into them (`recv_into`), so a
frame for a finished or foreign room is dropped, never written.
"""

from __future__ import annotations

import zmq

from transfer import messages as m
from transfer.backends.base import ReceiverBackend, SenderBackend, Write

ZERO_COPY_MIN = 64 * 1024  # below this a copy is cheaper than zmq's zero-copy bookkeeping
FRAME_BYTES = 8 * 2**20  # large ranges go in several frames so receive and copy overlap


class ZmqSender(SenderBackend):
    name = "zmq"

    def write(self, conn, desc, room: str, writes: list[Write]) -> None:
        sock = conn.sock
        for w in writes:
            data = w.src.numpy()
            rb = desc.buffers[w.buffer].row_bytes
            step = max(rb, FRAME_BYTES // rb * rb)  # frames hold whole rows
            for a in range(0, len(data), step):
                chunk = data[a : a + step]
                hdr = m.encode(m.Data(room=room, buffer=w.buffer, offset=w.offset + a, nbytes=len(chunk)))
                sock.send(hdr, zmq.SNDMORE)
                sock.send(memoryview(chunk), copy=len(chunk) < ZERO_COPY_MIN)


class ZmqReceiver(ReceiverBackend):
    name = "zmq"
    data_on_control = True

    def register(self, regions: dict[str, tuple[int, int]]) -> tuple[str, dict[str, int]]:
        return "", {n: 0 for n in regions}
