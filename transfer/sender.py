"""TransferSender: the encoder's end of the data plane — push one request's rows into a room.

`send(descriptor, payload, deadline_s)` does the whole exchange on one pooled control connection.
ZMQ fast path (the rows fit the descriptor's blocks): the rows go in Data messages whose first
claims the room and whose last carries the Done seal, then one Ack. Otherwise the handshake first:
Begin -> Ready (right receiver, room open), the rows that fit, Partial -> Resume while more are
needed, the aux record, Done -> Ack. Mooncake always waits for Ready before writing (its writes
bypass the receiver, so it must know the room is still this request's; the payload is prepared
while the handshake travels); ZMQ pipelines its rows behind the Begin. It returns a `SendResult` or
raises `TransferFailed` (after telling the receiver to abort). `abandon` tells a receiver that a
descriptor will never be written. Thread-safe: each room uses its own connection from the pool;
every backend the descriptors name is started lazily.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import zmq

from transfer import messages as m
from transfer.backends import SenderBackend, TransferError, Write, sender_backend
from transfer.buffers import runs
from transfer.config import SenderSettings
from transfer.payload import AuxRecord, MultimodalPayload, checksum, room_tag

log = logging.getLogger(__name__)


class TransferFailed(RuntimeError):
    """The rows did not arrive; the message says why (receiver refusal, deadline, peer gone)."""


@dataclass
class SendResult:
    rows: int
    bytes: int
    resumes: int
    seconds: float


class _Conn:
    """One DEALER connection to a receiver's control socket, used by one room at a time."""

    def __init__(self, ctx: zmq.Context, endpoint: str) -> None:
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        self.sock.connect(endpoint)
        self._stash: list = []  # answers of the current room read early by `aborted`

    def send(self, msg) -> None:
        self.sock.send(m.encode(msg))

    def expect(self, room: str, kind: type, deadline: float):
        """The next message of `room` of type `kind`; refusals and aborts raise TransferFailed."""
        while True:
            msg = self._stash.pop(0) if self._stash else self._recv(room, deadline, kind)
            if isinstance(msg, m.Ack) and not msg.ok or isinstance(msg, m.Abort):
                raise TransferFailed(f"room {room} refused by the receiver: {msg.reason}")
            if isinstance(msg, kind):
                return msg

    def _recv(self, room: str, deadline: float, kind: type):
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(max(1, int(left * 1000))):
                raise TransferFailed(
                    f"room {room}: no {kind.__name__} from {self.endpoint} before the deadline"
                )
            try:
                msg = m.decode(self.sock.recv())
            except m.BadMessage as e:
                log.warning("transfer: bad answer from %s: %s", self.endpoint, e)
                continue
            if msg.room == room:
                return msg  # else: a late answer for an earlier room on this connection

    def aborted(self, room: str) -> str | None:
        """A refusal/abort for `room` already waiting (checked between chunks); other answers are kept."""
        while self.sock.poll(0):
            try:
                msg = m.decode(self.sock.recv())
            except m.BadMessage:
                continue
            if msg.room != room:
                continue
            if isinstance(msg, m.Abort) or isinstance(msg, m.Ack) and not msg.ok:
                return msg.reason
            self._stash.append(msg)
        return None

    def close(self) -> None:
        self.sock.close(0)


class TransferSender:
    def __init__(self, settings: SenderSettings | None = None) -> None:
        self.settings = settings or SenderSettings()
        self._ctx = zmq.Context.instance()
        self._backends: dict[str, SenderBackend] = {}
        self._idle: dict[str, list[_Conn]] = {}
        self._lock = threading.Lock()

    def backend(self, name: str) -> SenderBackend:
        with self._lock:
            if name not in self._backends:
                self._backends[name] = sender_backend(name, self.settings)
            return self._backends[name]

    def send(
        self, descriptor: m.RoomDescriptor | dict, payload: MultimodalPayload, deadline_s: float | None = None
    ) -> SendResult:
        t0 = time.monotonic()
        desc = (
            descriptor if isinstance(descriptor, m.RoomDescriptor) else m.descriptor_from_builtins(descriptor)
        )
        ttl = desc.ttl_s if deadline_s is None else min(desc.ttl_s, deadline_s)
        deadline = t0 + ttl
        try:
            backend = self.backend(desc.backend)
        except TransferError as e:
            raise TransferFailed(f"room {desc.room}: {e}") from None
        conn = self._get(desc.control)
        try:
            res = self._exchange(conn, backend, desc, payload, deadline)
        except (TransferFailed, TransferError, zmq.ZMQError) as e:
            self._abort(conn, desc.room, str(e))
            raise TransferFailed(
                str(e) if isinstance(e, TransferFailed) else f"room {desc.room}: {e}"
            ) from None
        except BaseException:
            self._abort(conn, desc.room, "sender error")
            raise
        self._put(conn)
        res.seconds = time.monotonic() - t0
        return res

    def _exchange(self, conn: _Conn, backend, desc, payload: MultimodalPayload, deadline) -> SendResult:
        room, n, v = desc.room, payload.total_rows, payload.vision_rows
        if n == 0:
            raise TransferFailed(f"room {room}: empty prompt")
        oob = backend.writes_out_of_band
        fast = not oob and n <= len(desc.block_ids) * desc.block_size
        if not fast:
            conn.send(m.Begin(room=room, receiver_id=desc.receiver_id, total_rows=n))
        try:  # while the handshake travels
            rows = payload.prepare(desc.hidden, desc.num_deepstack, desc.dtype)
        except ValueError as e:
            raise TransferFailed(f"room {room}: {e}") from None
        crc = checksum(rows, desc.checksum == "full")
        aux = AuxRecord(room_tag(room), n, v, payload.mrope_delta, payload.num_images, crc).pack()
        done = m.Done(
            room=room,
            total_rows=n,
            vision_rows=v,
            mrope_delta=payload.mrope_delta,
            num_images=payload.num_images,
            checksum=crc,
        )
        blocks, ready = desc.block_ids, None
        if fast:
            writes = self._writes(desc, blocks, rows, 0, n, v) + [self._seal(desc, blocks, aux)]
            backend.write(conn, desc, room, writes, claim=n, done=done)
            conn.expect(room, m.Ack, deadline)
            return SendResult(rows=n, bytes=sum(w.src.nbytes for w in writes), resumes=0, seconds=0.0)
        if oob:  # never write memory before the receiver confirmed the room
            ready = conn.expect(room, m.Ready, deadline)
            blocks = ready.block_ids
        sent, resumes, nbytes = 0, 0, 0
        while True:
            upto = min(n, len(blocks) * desc.block_size)
            writes = self._writes(desc, blocks, rows, sent, upto, v)
            if upto == n:  # the seal goes last, with the final rows
                writes.append(self._seal(desc, blocks, aux))
            backend.write(conn, desc, room, writes)
            nbytes += sum(w.src.nbytes for w in writes)
            sent = upto
            reason = conn.aborted(room)
            if reason is not None:
                raise TransferFailed(f"room {room} aborted by the receiver: {reason}")
            if sent == n:
                break
            if ready is None:  # pipelined handshake: the room may have grown already
                ready = conn.expect(room, m.Ready, deadline)
                if len(ready.block_ids) > len(blocks):
                    blocks = ready.block_ids
                    continue
            conn.send(m.Partial(room=room, total_rows=n, sent_rows=sent))
            resume = conn.expect(room, m.Resume, deadline)
            if resume.sent_rows != sent or len(resume.block_ids) <= len(blocks):
                raise TransferFailed(f"room {room}: inconsistent resume ({resume.sent_rows} != {sent})")
            blocks, resumes = resume.block_ids, resumes + 1
            if time.monotonic() > deadline:
                raise TransferFailed(f"room {room}: deadline passed while resuming")
        conn.send(done)
        conn.expect(room, m.Ack, deadline)
        return SendResult(rows=n, bytes=nbytes, resumes=resumes, seconds=0.0)

    @staticmethod
    def _seal(desc, blocks: list[int], aux: torch.Tensor) -> Write:
        return Write("aux", blocks[0] * desc.buffers["aux"].row_bytes, aux.view(torch.uint8).numpy())

    @staticmethod
    def _writes(desc, blocks, rows, start: int, stop: int, vision_rows: int) -> list[Write]:
        out = []
        for name, t in rows.items():
            limit = stop if name in ("fill_ids", "mrope") else min(stop, vision_rows)
            rb = desc.buffers[name].row_bytes
            if limit <= start or rb == 0:
                continue
            src = t.view(-1).view(torch.uint8).numpy()  # rows are contiguous: row r is src[r*rb:(r+1)*rb]
            if src.size != t.shape[0] * rb:
                raise TransferFailed(
                    f"{name} rows are {src.size // max(1, t.shape[0])} bytes, the receiver's are {rb}"
                )
            for r in runs(blocks, desc.block_size, start, limit):
                out.append(Write(name, r.dst_row * rb, src[r.src_row * rb : (r.src_row + r.n) * rb]))
        return out

    def abandon(self, descriptor: m.RoomDescriptor | dict, reason: str) -> None:
        """Tell the receiver that this descriptor will never be written (e.g. the encode failed), so
        it can fail the room and free its blocks at once. Best effort; never raises."""
        try:
            desc = (
                descriptor
                if isinstance(descriptor, m.RoomDescriptor)
                else m.descriptor_from_builtins(descriptor)
            )
            conn = self._get(desc.control)
            conn.sock.send(m.encode(m.Abort(room=desc.room, reason=reason[:500])), zmq.NOBLOCK)
        except (m.BadMessage, zmq.ZMQError) as e:
            log.debug("could not abandon a room: %s", e)
            return
        self._put(conn)

    def _get(self, endpoint: str) -> _Conn:
        with self._lock:
            idle = self._idle.get(endpoint)
            if idle:
                return idle.pop()
        return _Conn(self._ctx, endpoint)

    def _put(self, conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(conn.endpoint, [])
            if len(idle) < self.settings.max_idle_sockets:
                idle.append(conn)
                return
        conn.close()

    def _abort(self, conn: _Conn, room: str, reason: str) -> None:
        try:
            conn.sock.send(m.encode(m.Abort(room=room, reason=reason[:500])), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        conn.close()  # never reuse a connection that may hold stale frames

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
            backends = list(self._backends.values())
        for c in conns:
            c.close()
        for b in backends:
            b.close()
