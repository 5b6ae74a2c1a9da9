"""TransferReceiver: the language node's end of the data plane.

It owns the `MultimodalDataBuffers`, registers them with the chosen backend, and runs one control
thread on a ZMQ ROUTER socket that answers senders (handshake, resume, done), receives ZMQ data
frames straight into the blocks, and fails rooms whose deadline passed. The thread sleeps until a
message, an API thread's wake-up (an abort to send) or the next deadline: an idle receiver costs no
CPU (polling every 5 ms cost ~4% of a core here, and ~0.2 ms of CPU per wake). API threads call
`open_room` (descriptor for an encoder), `future`/`wait_room` (the rows), `release` and `abort`.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
import uuid
import zlib
from concurrent.futures import Future
from dataclasses import dataclass

import torch
import zmq

from transfer import messages as m
from transfer.allocator import BlockAllocator
from transfer.backends import receiver_backend
from transfer.buffers import NAMES, MultimodalDataBuffers, runs
from transfer.config import BufferSpec, ReceiverSettings
from transfer.heap import keep_freed_heap
from transfer.payload import AuxRecord, room_tag, signed32
from transfer.rooms import Room, RoomFailed, RoomTable, State

log = logging.getLogger(__name__)
__all__ = ["ReceivedRoom", "RoomFailed", "TransferReceiver"]
RESUME_RETRY_S = 0.005  # how often a room waiting for blocks (a full pool) tries again
MAX_SLEEP_S = 1.0  # the control thread wakes at least this often (and at least once per room TTL)


@dataclass
class ReceivedRoom:
    room: str
    fill_ids: torch.Tensor  # [N] int32 (view into the pool when its blocks are consecutive)
    positions: torch.Tensor  # [3, N] int32
    embeddings: torch.Tensor  # [V, H]
    deepstack: torch.Tensor  # [V, n_ds * H]
    mrope_delta: int
    num_images: int
    _receiver: TransferReceiver | None = None
    ready_at: float = 0.0  # time.monotonic() when the rows were verified (the host's clock)

    def release(self) -> None:
        """Give the blocks back (after prefill consumed the rows); idempotent."""
        r, self._receiver = self._receiver, None
        if r is not None:
            r.release(self.room)


class TransferReceiver:
    def __init__(self, spec: BufferSpec, settings: ReceiverSettings) -> None:
        self.spec, self.settings = spec, settings
        self.id = uuid.uuid4().hex
        self.buffers = MultimodalDataBuffers(spec)
        self.allocator = BlockAllocator(spec.num_blocks)
        self.rooms = RoomTable(self.allocator, settings.stale_write_guard_s)
        keep_freed_heap(settings.keep_freed_heap_bytes)
        self.backend = receiver_backend(settings.backend, settings)
        self.session, addrs = self.backend.register(self.buffers.regions())
        self._row_bytes = {n: self.buffers.row_bytes(n) for n in NAMES}
        self._flat = {n: self.buffers.tensor(n).view(-1).view(torch.uint8).numpy() for n in NAMES}
        self._aux_words = self.buffers.aux.numpy()
        self._addrs = {n: m.BufferAddr(addr=addrs[n], row_bytes=self._row_bytes[n]) for n in NAMES}
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        # a sender that reconnects (its link went down and came back) keeps its identity; without
        # handover the ROUTER refuses the new connection while the old one looks alive, and that
        # sender's Done or Abort - what ends a quarantine - would be lost
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        if settings.control_port:
            self._sock.bind(f"tcp://{settings.host}:{settings.control_port}")
            self.control = f"tcp://{settings.host}:{settings.control_port}"
        else:
            port = self._sock.bind_to_random_port(f"tcp://{settings.host}")
            self.control = f"tcp://{settings.host}:{port}"
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # API threads wake the control thread through it
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._loop, name="transfer-receiver", daemon=True)
        self._thread.start()
        log.info(
            "transfer receiver %s: %s backend, control %s, pool %d x %d rows (%.1f MiB)",
            self.id[:8],
            settings.backend,
            self.control,
            spec.num_blocks,
            spec.block_size,
            self.buffers.nbytes / 2**20,
        )

    # ---- API (any thread) ----
    def open_room(self, num_rows: int, room: str | None = None, timeout_s: float = 10.0) -> m.RoomDescriptor:
        """Allocate blocks for `num_rows` (waiting up to `timeout_s` for a full pool) and describe them."""
        room = room or uuid.uuid4().hex
        need = max(1, math.ceil(num_rows / self.spec.block_size))
        blocks = self.allocator.alloc(min(need, self.spec.num_blocks), timeout_s)
        ttl = self.settings.room_ttl_s
        self.rooms.add(Room(room, blocks, time.monotonic() + ttl, tag=room_tag(room)))
        s = self.spec
        return m.RoomDescriptor(
            room=room,
            receiver_id=self.id,
            backend=self.settings.backend,
            control=self.control,
            session=self.session,
            block_ids=list(blocks),
            block_size=s.block_size,
            hidden=s.hidden,
            num_deepstack=s.num_deepstack,
            dtype=s.dtype,
            buffers=self._addrs,
            ttl_s=ttl,
            checksum=self.settings.checksum,
        )

    def future(self, room: str) -> Future:
        r = self.rooms.get(room)
        if r is None:
            f: Future = Future()
            f.set_exception(RoomFailed(f"room {room}: {self.rooms.outcome(room) or 'unknown'}"))
            return f
        return r.future

    def wait_room(self, room: str, timeout_s: float | None = None) -> ReceivedRoom:
        return self.future(room).result(timeout_s)

    def release(self, room: str) -> None:
        self.rooms.release(room)

    def abort(self, room: str, reason: str = "aborted by receiver", writer_gone: bool = False) -> None:
        """Drop a room in any state: frees its blocks and tells its sender to stop.

        With an out-of-band backend (Mooncake) a sender that has claimed the room may be writing, so
        its blocks wait in quarantine until it reports back; `writer_gone=True` says no write can
        come any more (the encoder answered) and frees them now.
        """
        if self.rooms.release(room):
            return
        oob = not self.backend.data_on_control
        r = self.rooms.fail(room, reason, out_of_band_writer=oob and not writer_gone)
        if r is not None and r.peer is not None:
            self._outbox.put((r.peer, m.Abort(room=room, reason=reason)))
        if writer_gone:
            self.rooms.writer_done(room, None)
        self._wake()  # to send the Abort, and to plan for a quarantine that may end sooner

    def stats(self) -> dict:
        with self.rooms.lock:
            states = [r.state.value for r in self.rooms.rooms.values()]
            c = dict(self.rooms.counters)
        return {
            "blocks_total": self.spec.num_blocks,
            "blocks_used": self.allocator.num_used,
            "blocks_free": self.allocator.num_free,
            "blocks_quarantined": self.rooms.quarantined_blocks,
            "rooms": {s.value: states.count(s.value) for s in State},
            **c,
        }

    def close(self) -> None:
        """Fail every room, close the sockets and the backend; a second call does nothing."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake()
        self._thread.join(timeout=5)
        for rid in list(self.rooms.rooms):
            self.rooms.fail(rid, "receiver closed")
        self._sock.close(0)
        self.backend.close()
        w, self._wake_w = self._wake_w, -1
        os.close(w)
        os.close(self._wake_r)

    def _wake(self) -> None:
        try:
            if self._wake_w >= 0:  # not closed
                os.write(self._wake_w, b"w")
        except BlockingIOError:  # the pipe is full: the thread has wake-ups pending anyway
            pass

    # ---- control thread ----
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        # a room's deadline is its open time + TTL, so sleeping at most one TTL never misses one
        longest = min(MAX_SLEEP_S, self.settings.room_ttl_s)
        planned = 0.0  # when to housekeep next: the earliest deadline, quarantine end or retry
        while not self._stop.is_set():
            try:
                now = time.monotonic()
                planned = min(planned, self.rooms.next_due(now, RESUME_RETRY_S))
                if now >= planned:
                    self._housekeep(now)
                    planned = min(self.rooms.next_due(now, RESUME_RETRY_S), now + longest)
                ready = dict(poller.poll(max(0, math.ceil((planned - now) * 1000))))
                if self._wake_r in ready:
                    self._drain_wakes()
                if self._sock in ready:
                    for _ in range(256):
                        self._recv_one()
                        if not self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                            break
                self._drain_outbox()
            except Exception:  # noqa: BLE001 - one bad message must not stop the receiver
                log.exception("transfer receiver: unexpected error in control loop")

    def _drain_wakes(self) -> None:
        try:
            while len(os.read(self._wake_r, 4096)) == 4096:
                pass
        except BlockingIOError:  # exactly a multiple of 4096 bytes were waiting
            pass

    def _send(self, peer: bytes, msg) -> None:
        try:
            self._sock.send_multipart([peer, m.encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.warning("could not answer %s for room %s: %s", type(msg).__name__, msg.room, e)

    def _drain_outbox(self) -> None:
        while not self._outbox.empty():
            peer, msg = self._outbox.get_nowait()  # only this thread takes from it
            self._send(peer, msg)

    def _skip_rest(self) -> None:
        while self._sock.getsockopt(zmq.RCVMORE):
            self._sock.recv()

    def _recv_one(self) -> None:
        try:
            peer = self._sock.recv(zmq.NOBLOCK)
        except zmq.Again:
            return
        if not self._sock.getsockopt(zmq.RCVMORE):
            return log.warning("transfer: empty message from a peer, ignored")
        raw = self._sock.recv()
        try:
            msg = m.decode(raw)
        except m.BadMessage as e:
            self._skip_rest()
            return log.warning("transfer: rejected control message: %s", e)
        if isinstance(msg, m.Data):
            return self._on_data(peer, msg)
        self._skip_rest()
        if isinstance(msg, m.Status):
            self.rooms.counters["status_queries"] += 1
        room = self.rooms.get(msg.room)
        if room is None:
            if self.rooms.writer_done(msg.room, peer):
                log.info(
                    "transfer: the sender of failed room %s is done writing; its blocks are free", msg.room
                )
            if (
                isinstance(msg, m.Status)
                and msg.waiting == "ack"
                and self.rooms.outcome(msg.room) == "released"
            ):
                return self._send(peer, m.Ack(room=msg.room, ok=True))  # its Ack was lost; the rows were used
            if not isinstance(msg, m.Abort | m.Ack):
                self._refuse_unknown(peer, msg)
            return
        if room.peer is not None and room.peer != peer:
            log.warning("transfer: %s for room %s from a second sender, refused", type(msg).__name__, room.id)
            if not isinstance(msg, m.Abort):
                self._send(peer, m.Ack(room=room.id, ok=False, reason="room is claimed by another sender"))
            return
        handler = self._HANDLERS.get(type(msg))
        if handler is None:
            return log.warning("transfer: unexpected %s from a sender, ignored", type(msg).__name__)
        handler(self, peer, room, msg)

    def _refuse_unknown(self, peer: bytes, msg) -> None:
        """Answer a message for a room this receiver does not have (late, or another incarnation's)."""
        self.rooms.counters["refused_" + type(msg).__name__.lower()] += 1
        rid = getattr(msg, "receiver_id", "")
        if rid and rid != self.id:
            why = "descriptor is for another receiver"
        else:
            why = "room is " + (self.rooms.outcome(msg.room) or "unknown")
        log.info("transfer: %s for room %s refused (%s)", type(msg).__name__, msg.room, why)
        self._send(peer, m.Ack(room=msg.room, ok=False, reason=why))

    def _claim(self, peer: bytes, room: Room, receiver_id: str, how: str) -> str | None:
        """The handshake's checks (Begin, or a fast-path Data/Done): None once the room is `peer`'s."""
        if receiver_id != self.id:
            return "descriptor is for another receiver"
        if room.state is not State.OPEN:
            return f"room is {room.state.value}"
        room.state, room.peer = State.RECEIVING, peer
        self.rooms.counters["claims_" + how] += 1
        return None

    def _on_begin(self, peer: bytes, room: Room, msg: m.Begin) -> None:
        refused = self._claim(peer, room, msg.receiver_id, "begin")
        if refused is not None:
            return self._send(peer, m.Ack(room=room.id, ok=False, reason=refused))
        more = math.ceil(msg.total_rows / self.spec.block_size) - len(room.blocks)
        if more > 0 and self.settings.grow_on_begin:  # grow now if we can: saves the resume round trip
            got = self.allocator.try_alloc(more, after=room.blocks[-1])
            if got:
                room.blocks.extend(got)
        self._answer(room, peer, m.Ready(room=room.id, block_ids=room.blocks))

    def _answer(self, room: Room, peer: bytes, msg) -> None:
        """Send a step's answer and remember it: a sender whose link dropped asks for it again."""
        room.answer = msg
        self._send(peer, msg)

    def _on_status(self, peer: bytes, room: Room, msg: m.Status) -> None:
        """The sender's link dropped and came back while it waited for `msg.waiting`: the answer
        again if it was sent (and lost), else what it answers never arrived: the room fails now."""
        if room.answer is not None and type(room.answer).__name__.lower() == msg.waiting:
            return self._send(peer, room.answer)
        if room.want is not None and msg.waiting == "resume":
            return  # its Partial came: the Resume follows once blocks are free
        reason = (
            f"the sender's last message before it waited for {msg.waiting} never arrived "
            "(lost with a dropped connection)"
        )
        self._fail(room, reason)
        if room.peer is None:  # not even its claim came: `_fail` had nobody to tell
            self._send(peer, m.Ack(room=room.id, ok=False, reason=reason))

    def _on_partial(self, peer: bytes, room: Room, msg: m.Partial) -> None:
        room.answer = None  # a new step: the previous answer is no longer what the sender waits for
        cap = len(room.blocks) * self.spec.block_size
        if room.state is not State.RECEIVING or msg.sent_rows != cap or msg.total_rows <= cap:
            return self._fail(
                room, f"bad resume request (sent {msg.sent_rows}, total {msg.total_rows}, have {cap})"
            )
        room.want = (math.ceil(msg.total_rows / self.spec.block_size) - len(room.blocks), msg.sent_rows)
        self._try_resume(room)

    def _try_resume(self, room: Room) -> None:
        need, sent = room.want
        if len(room.blocks) + need > self.spec.num_blocks:
            return self._fail(
                room, f"request needs {len(room.blocks) + need} blocks, the pool has {self.spec.num_blocks}"
            )
        got = self.allocator.try_alloc(need, after=room.blocks[-1])
        if got is None:
            return  # back-pressure: retried on every loop until blocks free up or the deadline passes
        room.blocks.extend(got)
        room.want = None
        self.rooms.counters["resumes"] += 1
        self._answer(room, room.peer, m.Resume(room=room.id, block_ids=room.blocks, sent_rows=sent))

    def _on_data(self, peer: bytes, msg: m.Data) -> None:
        # a Data message never ends a quarantine: a Mooncake sender sends its ids, positions and seal
        # while its write is still moving (only what it sends after the write returned does)
        room = self.rooms.get(msg.room)
        if msg.receiver_id or msg.done is not None:  # fast path: the sender waits for an Ack
            if room is None:
                self._skip_rest()
                return self._refuse_unknown(peer, msg)
            refused = self._claim(peer, room, msg.receiver_id, "data") if msg.receiver_id else None
            if refused is not None:
                self._skip_rest()
                return self._send(peer, m.Ack(room=msg.room, ok=False, reason=refused))
        ok = room is not None and room.peer == peer and room.state is State.RECEIVING
        reason = None if ok else "no such receiving room"
        for buffer, offset, nbytes in msg.segments:
            if reason is None:
                reason = self._owns(room, buffer, offset, nbytes)
            if reason is None and buffer != "aux":  # the seal is checked by its contents
                rb = self._row_bytes[buffer]
                reason = room.take_rows(buffer, offset // rb, (offset + nbytes) // rb, self.spec.block_size)
            if not self._sock.getsockopt(zmq.RCVMORE):
                reason = reason or "fewer frames than segments"
                break
            if reason is not None:
                break
            n = self._sock.recv_into(self._flat[buffer][offset : offset + nbytes])
            if n != nbytes:
                reason = f"frame of {n} bytes announced as {nbytes}"
        self._skip_rest()
        if reason is not None and room is not None and room.state is State.RECEIVING:
            self._fail(room, f"bad data frame: {reason}")
        elif reason is not None:
            log.debug("transfer: data for room %s dropped: %s", msg.room, reason)
        elif msg.done is not None:
            self._on_done(peer, room, msg.done)

    def _owns(self, room: Room, buffer: str, offset: int, nbytes: int) -> str | None:
        """None if the byte range lies in rows (or the aux slot) this room owns, else why not."""
        if buffer not in NAMES:
            return f"unknown buffer {buffer!r}"
        rb = self._row_bytes[buffer]
        if rb == 0 or offset % rb or nbytes % rb or nbytes <= 0:
            return f"{buffer}[{offset}:+{nbytes}] is not whole rows"
        r0, r1 = offset // rb, (offset + nbytes) // rb
        if buffer == "aux":
            return None if (r0, r1) == (room.blocks[0], room.blocks[0] + 1) else "aux slot of another room"
        bs, owned = self.spec.block_size, room.positions()
        if all(b in owned for b in range(r0 // bs, (r1 - 1) // bs + 1)):
            return None
        return f"{buffer} rows {r0}..{r1} are not this room's"

    def _on_done(self, peer: bytes, room: Room, msg: m.Done) -> None:
        if room.state is not State.RECEIVING:
            return self._send(peer, m.Ack(room=room.id, ok=False, reason=f"room is {room.state.value}"))
        cap = len(room.blocks) * self.spec.block_size
        if not 0 <= msg.vision_rows <= msg.total_rows <= cap or msg.total_rows == 0:
            return self._fail(
                room,
                f"lengths out of range (rows {msg.total_rows}, vision {msg.vision_rows}, capacity {cap})",
            )
        reason = self._verify(room, msg)
        if reason is not None:
            return self._fail(room, reason)
        self._answer(room, peer, m.Ack(room=room.id, ok=True))  # verified: the sender need not wait more
        rows = self.buffers.read(room.blocks, msg.total_rows, msg.vision_rows)
        result = ReceivedRoom(
            room.id,
            rows["fill_ids"],
            rows["mrope"].t(),
            rows["embeddings"],
            rows["deepstack"],
            msg.mrope_delta,
            msg.num_images,
            self,
            time.monotonic(),
        )
        self.rooms.done(room, result)

    @staticmethod
    def _row_counts(msg: m.Done, vision: bool) -> dict[str, int]:
        """Rows per buffer the seal announces: ids and positions, and (if asked) vision and deepstack."""
        counts = {"fill_ids": msg.total_rows, "mrope": msg.total_rows}
        if vision:
            counts.update(embeddings=msg.vision_rows, deepstack=msg.vision_rows)
        return counts

    def _incomplete(self, room: Room, msg: m.Done) -> str | None:
        """None if every row that travels on the control link arrived once: ids and positions
        always, vision and deepstack rows too when the backend moves rows there (ZMQ)."""
        for name, count in self._row_counts(msg, self.backend.data_on_control).items():
            if self._row_bytes[name]:
                reason = room.rows_missing(name, count)
                if reason is not None:
                    return f"torn write: {reason}"
        return None

    def _verify(self, room: Room, msg: m.Done) -> str | None:
        """None if the seal, the rows that came and the checksum match `msg` (this room's write, whole)."""
        if AuxRecord.unpack(self._aux_words[room.blocks[0]]) != AuxRecord(
            room.tag, msg.total_rows, msg.vision_rows, msg.mrope_delta, msg.num_images, msg.checksum
        ):
            return "aux record missing or does not match (torn or stale write)"
        missing = self._incomplete(room, msg)
        if missing is not None:
            return missing
        crc = 0  # in the payload's order (payload.checksum), straight off the pool
        for name, n in self._row_counts(msg, self.settings.checksum == "full").items():
            rb, flat = self._row_bytes[name], self._flat[name]
            for r in runs(room.blocks, self.spec.block_size, 0, n):
                crc = zlib.crc32(flat[r.dst_row * rb : (r.dst_row + r.n) * rb], crc)
        if signed32(crc) != msg.checksum:
            return "checksum mismatch (torn write)"
        return None

    def _on_abort(self, peer: bytes, room: Room, msg: m.Abort) -> None:
        self.rooms.fail(room.id, f"sender aborted: {msg.reason}", out_of_band_writer=False)

    _HANDLERS = {
        m.Begin: _on_begin,
        m.Partial: _on_partial,
        m.Done: _on_done,
        m.Abort: _on_abort,
        m.Status: _on_status,
    }

    def _fail(self, room: Room, reason: str) -> None:
        log.warning("transfer: room %s failed: %s", room.id, reason)
        self.rooms.fail(room.id, reason, out_of_band_writer=not self.backend.data_on_control)
        if room.peer is not None:
            self._send(room.peer, m.Ack(room=room.id, ok=False, reason=reason))

    def _housekeep(self, now: float) -> None:
        for room in self.rooms.waiting_resume():
            self._try_resume(room)
        for room in self.rooms.expired(now):
            self._fail(room, f"deadline: not complete within {self.settings.room_ttl_s:.1f}s")
