"""Hostile or confused peers: malformed control messages, frames for rooms a peer does not own,
late and duplicate messages. The receiver logs, refuses, and keeps serving."""

from __future__ import annotations

import msgspec
import pytest
import torch
import zmq

import transfer.sender
from tests.transfer.conftest import BACKENDS, wait_until
from tests.transfer.peer import make_payload
from transfer import RoomFailed, SenderSettings, TransferFailed, TransferSender, descriptor_to_builtins
from transfer import messages as m
from transfer.backends import Write, zmq_backend

pytestmark = pytest.mark.slow


def dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def answer(sock: zmq.Socket, timeout_ms: int = 3000):
    assert sock.poll(timeout_ms), "no answer"
    return m.decode(sock.recv())


@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_is_rejected_and_the_receiver_keeps_serving(backend, make_receiver, sender, caplog):
    rx = make_receiver(backend)
    s = dealer(rx.control)
    s.send(b"\xff\x00 not msgpack")
    s.send(
        msgspec.msgpack.encode({"t": "begin", "v": 99, "room": "x", "receiver_id": rx.id, "total_rows": 1})
    )
    s.send(msgspec.msgpack.encode({"t": "explode", "room": "x"}))
    s.send(msgspec.msgpack.encode({"t": "begin", "room": "x", "receiver_id": rx.id, "total_rows": "many"}))
    s.send_multipart([b"", b""])
    wait_until(
        lambda: sum("rejected control message" in r.message for r in caplog.records) >= 4,
        what="four rejections logged",
    )
    desc = rx.open_room(20)
    status, info = sender.send(descriptor_to_builtins(desc), 2, (20, 8, 64, 3, "float32"))
    assert status == "ok", info
    rx.wait_room(desc.room, 5).release()
    s.close()


def test_data_outside_the_room_fails_it_and_writes_nothing(make_receiver):
    rx = make_receiver("zmq")
    a, b = rx.open_room(16), rx.open_room(16)
    s = dealer(rx.control)
    s.send(m.encode(m.Begin(room=a.room, receiver_id=rx.id, total_rows=16)))
    assert isinstance(answer(s), m.Ready)
    rb = rx.buffers.row_bytes("embeddings")
    before = rx.buffers.embeddings[b.block_ids[0] * 16].clone()
    hdr = m.Data(room=a.room, segments=[("embeddings", b.block_ids[0] * 16 * rb, rb)])
    s.send_multipart([m.encode(hdr), b"\x01" * rb])  # into b's block
    reply = answer(s)
    assert isinstance(reply, m.Ack) and not reply.ok and "not this room's" in reply.reason
    assert (rx.buffers.embeddings[b.block_ids[0] * 16] == before).all()
    with pytest.raises(RoomFailed):
        rx.wait_room(a.room, 1)
    assert rx.rooms.get(b.room) is not None  # the other room is untouched
    s.close()


def test_data_for_unknown_room_and_oversized_frame(make_receiver):
    rx = make_receiver("zmq")
    d = rx.open_room(16)
    s = dealer(rx.control)
    s.send_multipart([m.encode(m.Data(room="nope", segments=[("fill_ids", 0, 4)])), b"\0" * 4])
    s.send(m.encode(m.Begin(room=d.room, receiver_id=rx.id, total_rows=16)))
    assert isinstance(answer(s), m.Ready)
    off = d.block_ids[0] * 16 * 4
    s.send_multipart([m.encode(m.Data(room=d.room, segments=[("fill_ids", off, 8)])), b"\0" * 64])
    reply = answer(s)
    assert not reply.ok and "announced as 8" in reply.reason
    wait_until(lambda: rx.stats()["blocks_used"] == 0, what="blocks freed")
    s.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_late_and_duplicate_messages_are_ignored(backend, make_receiver, sender):
    rx = make_receiver(backend)
    desc = rx.open_room(30)
    status, _ = sender.send(descriptor_to_builtins(desc), 4, (30, 10, 64, 3, "float32"))
    assert status == "ok"
    got = rx.wait_room(desc.room, 5)
    s = dealer(rx.control)
    s.send(
        m.encode(m.Done(room=desc.room, total_rows=1, vision_rows=0, mrope_delta=0, num_images=0, checksum=0))
    )
    s.send(m.encode(m.Begin(room=desc.room, receiver_id=rx.id, total_rows=30)))
    assert not answer(s).ok and not answer(s).ok
    got.release()
    s.send(m.encode(m.Partial(room=desc.room, total_rows=99, sent_rows=16)))
    reply = answer(s)
    assert not reply.ok and "released" in reply.reason
    want = make_payload(4, 30, 10, 64, 3, "float32")
    assert rx.stats()["blocks_used"] == 0 and want.total_rows == 30
    s.close()


def test_done_without_rows_is_a_torn_write(make_receiver):
    rx = make_receiver("zmq")
    d = rx.open_room(16)
    s = dealer(rx.control)
    s.send(m.encode(m.Begin(room=d.room, receiver_id=rx.id, total_rows=16)))
    assert isinstance(answer(s), m.Ready)
    s.send(
        m.encode(m.Done(room=d.room, total_rows=16, vision_rows=4, mrope_delta=0, num_images=1, checksum=5))
    )
    reply = answer(s)
    assert not reply.ok and "torn or stale" in reply.reason
    with pytest.raises(RoomFailed, match="torn"):
        rx.wait_room(d.room, 1)
    s.close()


def test_rows_on_the_control_link_during_a_write_do_not_end_a_quarantine(make_receiver):
    """A Mooncake sender sends ids, positions and the seal as a Data message while its write is
    still moving, and Done once it returned. For a room that failed mid-write, only the Done (what
    comes after the write) ends the quarantine; the Data before it writes nothing and frees nothing,
    and nobody but the room's sender can end it."""
    rx = make_receiver("mooncake", num_blocks=4, stale_write_guard_s=120)
    d = rx.open_room(16)
    s, stranger = dealer(rx.control), dealer(rx.control)
    s.send(m.encode(m.Begin(room=d.room, receiver_id=rx.id, total_rows=16)))
    assert isinstance(answer(s), m.Ready)
    rx.abort(d.room, "client went away")  # claimed: its sender may be writing
    assert isinstance(answer(s), m.Abort)
    assert rx.stats()["blocks_quarantined"] == 1
    head = m.Data(room=d.room, segments=[("fill_ids", d.block_ids[0] * 16 * 4, 64)])
    s.send_multipart([m.encode(head), b"\x07" * 64])
    done = m.Done(room=d.room, total_rows=16, vision_rows=0, mrope_delta=0, num_images=0, checksum=0)
    stranger.send(m.encode(done))
    assert not answer(stranger).ok
    assert rx.stats()["blocks_quarantined"] == 1
    assert not rx.buffers.fill_ids.any(), "rows for a failed room were written into the pool"
    s.send(m.encode(done))
    assert not answer(s).ok
    assert rx.stats()["blocks_quarantined"] == 0 and rx.stats()["blocks_free"] == 4
    s.close()
    stranger.close()


def _lose(writes: list, how: str, row_bytes: dict[str, int]) -> list:
    """The room's writes as a faulty link or a buggy sender would deliver them."""
    if how == "deepstack lost":  # a whole message of rows dropped when the connection did
        return [w for w in writes if w.buffer != "deepstack"]
    if how == "fill_ids lost":
        return [w for w in writes if w.buffer != "fill_ids"]
    out = []
    for w in writes:
        if w.buffer != "embeddings":
            out.append(w)
            continue
        half = len(w.src) // row_bytes["embeddings"] // 2 * row_bytes["embeddings"]
        first, second = (
            Write(w.buffer, w.offset, w.src[:half]),
            Write(w.buffer, w.offset + half, w.src[half:]),
        )
        out += {"first rows lost": [second], "last rows lost": [first], "rows sent twice": [first, first]}[
            how
        ]
    return out


@pytest.mark.parametrize(
    ("backend", "how", "why"),
    [
        ("zmq", "deepstack lost", "deepstack rows 0..10 never arrived"),
        ("zmq", "first rows lost", "embeddings rows 0..5 never arrived"),
        ("zmq", "last rows lost", "embeddings rows 5..10 never arrived"),
        ("zmq", "rows sent twice", "embeddings rows 0..5 arrived twice"),
        ("mooncake", "fill_ids lost", "fill_ids rows 0..24 never arrived"),
    ],
)
def test_a_seal_over_rows_that_never_came_is_refused(backend, how, why, make_receiver, monkeypatch):
    """The seal and the checksum of ids and positions cannot tell that vision rows are missing, so
    the receiver takes each buffer's rows on the control link in request order and counts them: a
    room with a gap, a repeat, or a seal over rows that never came (a message lost when a
    connection dropped and reconnected, a sender's bug) fails with the rows named, is never handed
    to the model with the pool's stale rows, and frees its blocks."""
    rx = make_receiver(backend)
    rb = {n: rx.buffers.row_bytes(n) for n in ("embeddings", "fill_ids")}
    target = transfer.sender if backend == "mooncake" else zmq_backend  # who sends rows on the control link
    real = target.send_on_control
    monkeypatch.setattr(
        target, "send_on_control", lambda c, d, r, w, *a, **k: real(c, d, r, _lose(w, how, rb), *a, **k)
    )
    tx = TransferSender(SenderSettings(mooncake_min_piece_bytes=4096))
    try:
        d = rx.open_room(24)
        with pytest.raises(TransferFailed, match=why):
            tx.send(d, make_payload(1, 24, 10, 64, 3, "float32"), deadline_s=10)
        with pytest.raises(RoomFailed, match=why):
            rx.wait_room(d.room, 5)
        wait_until(lambda: rx.stats()["blocks_used"] == 0, what="the torn room's blocks freed")
        monkeypatch.undo()  # the link is healthy again: the next room arrives whole
        d = rx.open_room(24)
        tx.send(d, make_payload(2, 24, 10, 64, 3, "float32"), deadline_s=10)
        got, want = rx.wait_room(d.room, 5), make_payload(2, 24, 10, 64, 3, "float32")
        assert torch.equal(got.embeddings, want.embeddings) and torch.equal(got.deepstack, want.deepstack)
        got.release()
    finally:
        tx.close()
