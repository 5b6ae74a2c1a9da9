"""TransferSender: the encoder's end of the data plane — push one request's rows into a room.

`send(descriptor, payload, deadline_s)` does the whole exchange on one pooled control connection.
ZMQ fast path (the rows fit the descriptor's blocks): the rows go in Data messages whose first
claims the room and whose last carries the Done seal, then one Ack. Otherwise the handshake first:
Begin -> Ready (right receiver, room open), the rows that fit, Partial -> Resume while more are
needed, the aux record, Done -> Ack. Mooncake always waits for Ready before writing (its writes
bypass the receiver, so it must know the room is still this request's) and writes only the vision
and deepstack rows; ids, positions and the aux record go as a Data message on the control link
while those writes are in flight, and Done once they returned. `claim(descriptor, rows)` sends that
Begin ahead, as soon as the row count is known (while the vision tower runs), so the Ready is
already there when `send` starts. `send` returns a `SendResult` or raises `TransferFailed` (after
telling the receiver to abort); `abandon` tells a receiver that a descriptor will never be written.
Thread-safe: each room uses its own connection from the pool; every backend the descriptors name is
started lazily.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from transfer import messages as m
from transfer.backends import SenderBackend, TransferError, Write, WriteInFlight, sender_backend
from transfer.backends.zmq_backend import send_on_control
from transfer.buffers import runs
from transfer.config import SenderSettings, dead_peer_tcp
from transfer.payload import AuxRecord, MultimodalPayload, checksum, room_tag

log = logging.getLogger(__name__)
ABORT_LINGER_MS = 1000  # how long a closed connection may still take to deliver its Abort
# ... when the room was written out of band: that last Done/Abort is what ends the receiver's
# quarantine of the room's blocks, so after a partition it must outlast TCP's retransmission backoff
# (at most 120 s on Linux), not be dropped a second after the link came back
REPORT_LINGER_MS = 150_000
# a room waiting for an answer looks at its connection every LOSS_CHECK_MS and fails once it has been
# down (closed, reset, refused) for LOSS_GRACE_S without reconnecting: a receiver that died is noticed
# ~0.6 s after its kernel reset the connection, one restarted at the same address within the grace
# gets the room's queued messages (a dead host or a partition resets nothing: the kernel ends such a
# connection after `SenderSettings.link_timeout_s`, and then it is down too)
LOSS_CHECK_MS = 100
LOSS_GRACE_S = 0.5
_LINK_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED


class TransferFailed(RuntimeError):
    """The rows did not arrive; the message says why (receiver refusal, deadline, peer gone)."""


@dataclass
class SendResult:
    rows: int
    bytes: int
    resumes: int
    seconds: float
    started_at: float = 0.0  # time.monotonic() when `send` began (the host's clock, for benchmarks)


@dataclass
class _Claim:
    """A Begin sent ahead of the rows (`TransferSender.claim`): its connection and what it announced."""

    conn: _Conn
    total_rows: int
    deadline: float


class _Conn:
    """One DEALER connection to a receiver's control socket, used by one room at a time. A monitor on
    it sees the connection drop (the receiver's process died and its kernel reset it, or, with
    `link_timeout_s`, its host went silent), so a room waiting for an answer fails once it stayed down
    `LOSS_GRACE_S`, not at its deadline."""

    def __init__(self, ctx: zmq.Context, endpoint: str, link_timeout_s: float = 0.0) -> None:
        self.endpoint = endpoint
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        if link_timeout_s > 0:  # a silent peer (dead host, partition) ends it: the monitor sees that
            idle, interval, probes, user_timeout_ms = dead_peer_tcp(link_timeout_s)
            self.sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            self.sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, idle)
            self.sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, interval)
            self.sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, probes)
            self.sock.setsockopt(zmq.TCP_MAXRT, user_timeout_ms)  # TCP_USER_TIMEOUT on Linux
        self._monitor = self.sock.get_monitor_socket(_LINK_EVENTS)
        self._down: str | None = None  # why the link is down now (None: up, or still connecting)
        self._down_since = 0.0
        self.reconnects = 0  # times the link came back after being down
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
        seen = self.reconnects
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferFailed(
                    f"room {room}: no {kind.__name__} from {self.endpoint} before the deadline"
                )
            if not self.sock.poll(max(1, min(LOSS_CHECK_MS, int(left * 1000)))):
                down = self.link_down(LOSS_GRACE_S)
                if down is not None:
                    raise TransferFailed(f"room {room}: {down} while waiting for {kind.__name__}")
                if self.reconnects != seen and self._down is None:
                    # the link dropped and came back: what libzmq was writing then is lost, and so
                    # is what the receiver queued for us meanwhile; ask for the answer again
                    seen = self.reconnects
                    self.send(m.Status(room=room, waiting=kind.__name__.lower()))
                continue
            try:
                msg = m.decode(self.sock.recv())
            except m.BadMessage as e:
                log.warning("transfer: bad answer from %s: %s", self.endpoint, e)
                continue
            if msg.room == room:
                return msg  # else: a late answer for an earlier room on this connection

    def link_down(self, grace_s: float = 0.0) -> str | None:
        """Why the connection has been down for at least `grace_s` (the receiver closed or reset it,
        or refuses connections), else None (up, still being set up, or down too briefly: libzmq
        reconnects every 100 ms, and a receiver restarted at the same address takes the room's
        queued messages); reads the monitor's pending events, so "down since" is the first call
        that saw it (a waiting room calls it every `LOSS_CHECK_MS`)."""
        while self._monitor.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_CONNECTED:
                self.reconnects += self._down is not None
                self._down = None
            elif self._down is None and event in (zmq.EVENT_DISCONNECTED, zmq.EVENT_CONNECT_RETRIED):
                self._down_since = time.monotonic()
                self._down = (
                    f"the connection to {self.endpoint} was closed (receiver gone?)"
                    if event == zmq.EVENT_DISCONNECTED
                    else f"{self.endpoint} refuses connections (receiver gone?)"
                )
        if self._down is not None and time.monotonic() - self._down_since >= grace_s:
            return self._down
        return None

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

    def close(self, linger_ms: int = 0) -> None:
        """Close now; with `linger_ms`, what is still queued (an Abort) may go out meanwhile."""
        self.sock.disable_monitor()
        self._monitor.close(0)
        self.sock.close(linger_ms)


class TransferSender:
    def __init__(self, settings: SenderSettings | None = None) -> None:
        self.settings = settings or SenderSettings()
        self._ctx = zmq.Context.instance()
        self._backends: dict[str, SenderBackend] = {}
        self._idle: dict[str, list[_Conn]] = {}
        self._claims: dict[str, _Claim] = {}  # room -> claim awaiting its send/abandon
        self._lock = threading.Lock()

    def backend(self, name: str) -> SenderBackend:
        with self._lock:
            if name not in self._backends:
                self._backends[name] = sender_backend(name, self.settings)
            return self._backends[name]

    def claim(
        self, descriptor: m.RoomDescriptor | dict, total_rows: int, deadline_s: float | None = None
    ) -> bool:
        """Claim the room for `total_rows` now, before the rows exist, so the handshake travels while
        they are computed (out-of-band backends only: ZMQ claims with its first data). The next
        `send` or `abandon` of this room uses the claim. Best effort: False if nothing was sent
        (then `send` does the handshake itself and reports any error)."""
        try:
            desc = self._descriptor(descriptor)
            if not self.backend(desc.backend).writes_out_of_band or total_rows <= 0:
                return False
            conn = self._get(desc.control)
            conn.send(m.Begin(room=desc.room, receiver_id=desc.receiver_id, total_rows=total_rows))
        except (m.BadMessage, TransferError, TransferFailed, zmq.ZMQError) as e:
            log.debug("could not claim a room ahead: %s", e)
            return False
        ttl = desc.ttl_s if deadline_s is None else min(desc.ttl_s, deadline_s)
        with self._lock:
            stale = [r for r, c in self._claims.items() if c.deadline < time.monotonic()]
            expired = [self._claims.pop(r) for r in stale]  # never sent nor abandoned: a caller's bug
            self._claims[desc.room] = _Claim(conn, total_rows, time.monotonic() + ttl)
        for c in expired:
            c.conn.close()
        return True

    def send(
        self, descriptor: m.RoomDescriptor | dict, payload: MultimodalPayload, deadline_s: float | None = None
    ) -> SendResult:
        t0 = time.monotonic()
        desc = self._descriptor(descriptor)
        ttl = desc.ttl_s if deadline_s is None else min(desc.ttl_s, deadline_s)
        deadline = t0 + ttl
        with self._lock:
            claim = self._claims.pop(desc.room, None)
        try:
            backend = self.backend(desc.backend)
        except TransferError as e:
            if claim is not None:
                claim.conn.close()
            raise TransferFailed(f"room {desc.room}: {e}") from None
        conn = claim.conn if claim is not None else self._get(desc.control)
        try:
            res = self._exchange(conn, backend, desc, payload, deadline, claim)
        except (TransferFailed, TransferError, zmq.ZMQError) as e:
            if isinstance(e, WriteInFlight):  # bytes may still land: say nothing, it stays quarantined
                conn.close()
            else:
                self._abort(conn, desc.room, str(e), self._linger(backend))
            raise TransferFailed(
                str(e) if isinstance(e, TransferFailed) else f"room {desc.room}: {e}"
            ) from None
        except BaseException:
            self._abort(conn, desc.room, "sender error", self._linger(backend))
            raise
        self._put(conn)
        res.seconds, res.started_at = time.monotonic() - t0, t0
        return res

    @staticmethod
    def _descriptor(descriptor: m.RoomDescriptor | dict) -> m.RoomDescriptor:
        return (
            descriptor if isinstance(descriptor, m.RoomDescriptor) else m.descriptor_from_builtins(descriptor)
        )

    def _exchange(
        self, conn: _Conn, backend, desc, payload: MultimodalPayload, deadline, claim: _Claim | None
    ) -> SendResult:
        room, n, v = desc.room, payload.total_rows, payload.vision_rows
        if n == 0:
            raise TransferFailed(f"room {room}: empty prompt")
        if claim is not None and claim.total_rows != n:
            raise TransferFailed(f"room {room}: claimed for {claim.total_rows} rows, the payload has {n}")
        oob = backend.writes_out_of_band
        fast = not oob and n <= len(desc.block_ids) * desc.block_size
        if not fast and claim is None:
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
        src = self._sources(desc, rows, n, v)
        # out of band go the vision and deepstack rows only: ids, positions and the seal go on the
        # control link, checked on receipt (a range of a few hundred bytes in a Mooncake batch costs
        # it a whole transfer round: +0.3-0.4 ms per 1-4 MiB batch measured here)
        inline = {k: src.pop(k) for k in ("fill_ids", "mrope")} if oob else {}
        blocks, ready = desc.block_ids, None
        if fast:
            writes = self._writes(desc, blocks, src, 0, n, v) + [self._seal(desc, blocks, aux)]
            backend.write(conn, desc, room, writes, claim=n, done=done)
            conn.expect(room, m.Ack, deadline)
            return SendResult(rows=n, bytes=sum(w.src.nbytes for w in writes), resumes=0, seconds=0.0)
        if oob:  # never write memory before the receiver confirmed the room
            ready = conn.expect(room, m.Ready, deadline)
            blocks = ready.block_ids
            reason = conn.aborted(room)  # a claimed room may have been aborted since its Ready came
            if reason is not None:
                raise TransferFailed(f"room {room} aborted by the receiver: {reason}")
        sent, resumes, nbytes = 0, 0, 0
        while True:
            upto = min(n, len(blocks) * desc.block_size)
            writes = self._writes(desc, blocks, src, sent, upto, v)
            send_tail = None
            if upto == n and oob:  # ids, positions and the seal go on the control link while rows fly
                tail = self._writes(desc, blocks, inline, 0, n, v) + [self._seal(desc, blocks, aux)]
                send_tail = functools.partial(send_on_control, conn, desc, room, tail)
                nbytes += sum(w.src.nbytes for w in tail)
            elif upto == n:  # the seal goes last, with the final rows
                writes.append(self._seal(desc, blocks, aux))
            backend.write(conn, desc, room, writes, while_writing=send_tail)
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
        conn.send(done)  # every write has returned
        conn.expect(room, m.Ack, deadline)
        return SendResult(rows=n, bytes=nbytes, resumes=resumes, seconds=0.0)

    @staticmethod
    def _sources(desc, rows: dict[str, np.ndarray], n: int, v: int) -> dict[str, np.ndarray]:
        """The prepared rows checked against the receiver's row sizes; buffers the receiver does not
        have (row bytes 0: no deepstack layers) are left out."""
        out = {}
        for name, flat in rows.items():
            rb = desc.buffers[name].row_bytes
            if rb == 0:
                continue
            count = n if name in ("fill_ids", "mrope") else v
            if flat.size != count * rb:
                raise TransferFailed(
                    f"{name} rows are {flat.size // max(1, count)} bytes, the receiver's are {rb}"
                )
            out[name] = flat
        return out

    @staticmethod
    def _seal(desc, blocks: list[int], aux: np.ndarray) -> Write:
        return Write("aux", blocks[0] * desc.buffers["aux"].row_bytes, aux.view(np.uint8))

    @staticmethod
    def _writes(
        desc, blocks, src: dict[str, np.ndarray], start: int, stop: int, vision_rows: int
    ) -> list[Write]:
        out = []
        for name, flat in src.items():
            limit = stop if name in ("fill_ids", "mrope") else min(stop, vision_rows)
            if limit <= start:
                continue
            rb = desc.buffers[name].row_bytes
            for r in runs(blocks, desc.block_size, start, limit):
                out.append(Write(name, r.dst_row * rb, flat[r.src_row * rb : (r.src_row + r.n) * rb]))
        return out

    def abandon(self, descriptor: m.RoomDescriptor | dict, reason: str) -> None:
        """Tell the receiver that this descriptor will never be written (e.g. the encode failed), so
        it can fail the room and free its blocks at once. Best effort; never raises."""
        try:
            desc = self._descriptor(descriptor)
        except m.BadMessage as e:
            log.debug("could not abandon a room: %s", e)
            return
        with self._lock:
            claim = self._claims.pop(desc.room, None)
        if claim is not None:  # the claimed room's receiver takes an Abort only from the claimant
            return self._abort(claim.conn, desc.room, reason, REPORT_LINGER_MS)
        try:
            conn = self._get(desc.control)
            conn.sock.send(m.encode(m.Abort(room=desc.room, reason=reason[:500])), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.debug("could not abandon a room: %s", e)
            return
        self._put(conn)

    def _get(self, endpoint: str) -> _Conn:
        while True:
            with self._lock:
                idle = self._idle.get(endpoint)
                conn = idle.pop() if idle else None
            if conn is None:
                return _Conn(self._ctx, endpoint, self.settings.link_timeout_s)
            if conn.link_down() is None:
                return conn
            conn.close()  # its receiver went away while it was idle: a fresh one finds a new one

    def _put(self, conn: _Conn) -> None:
        with self._lock:
            idle = self._idle.setdefault(conn.endpoint, [])
            if len(idle) < self.settings.max_idle_sockets:
                idle.append(conn)
                return
        conn.close()

    @staticmethod
    def _linger(backend) -> int:
        """How long a failed room's connection keeps trying to deliver what it still holds: long for
        out-of-band writes (only small control messages, and the last of them ends a quarantine);
        short for ZMQ (the frames still queued hold the payload's memory)."""
        return REPORT_LINGER_MS if backend.writes_out_of_band else ABORT_LINGER_MS

    def _abort(self, conn: _Conn, room: str, reason: str, linger_ms: int = ABORT_LINGER_MS) -> None:
        try:
            conn.sock.send(m.encode(m.Abort(room=room, reason=reason[:500])), zmq.NOBLOCK)
        except zmq.ZMQError:
            pass
        # never reuse a connection that may hold stale frames; closing at once would drop the
        # queued Abort (LINGER 0), and the receiver would hold the room until its deadline (ZMQ)
        # or its quarantine guard (Mooncake); closing does not wait for the linger
        conn.close(linger_ms)

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            conns += [c.conn for c in self._claims.values()]
            self._idle.clear()
            self._claims.clear()
            backends = list(self._backends.values())
        for c in conns:
            c.close()
        for b in backends:
            b.close()
