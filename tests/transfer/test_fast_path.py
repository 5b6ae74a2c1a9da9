"""The ZMQ one-message fast path (a room that fits its blocks is claimed and sealed by its rows),
the Mooncake handshake it must not skip, and the ways a room ends early: aborted before any sender
came, abandoned by the encoder, aborted once the encoder answered, and a stale descriptor sent to a
receiver restarted on the same port."""

from __future__ import annotations

import pytest

from tests.transfer.conftest import BACKENDS, once_port_free, wait_until
from tests.transfer.peer import make_payload
from transfer import BufferSpec, ReceiverSettings, RoomFailed, TransferReceiver, descriptor_to_builtins

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", BACKENDS)]
SHAPE = (40, 20, 64, 3, "float32")


def send_ok(rx, sender, seed):
    desc = rx.open_room(SHAPE[0])
    status, info = sender.send(descriptor_to_builtins(desc), seed, SHAPE)
    assert status == "ok", info
    got = rx.wait_room(desc.room, 10)
    want = make_payload(seed, *SHAPE)
    assert got.embeddings.equal(want.embeddings) and got.fill_ids.long().equal(want.fill_ids)
    got.release()


def test_rooms_that_fit_skip_the_handshake(backend, make_receiver, sender):
    rx = make_receiver(backend)
    for seed in range(4):
        send_ok(rx, sender, seed)
    c = rx.stats()
    # Mooncake writes only after Begin/Ready; ZMQ claims with the rows (frames are checked on receipt)
    if backend == "mooncake":
        assert c["claims_begin"] == 4 and c.get("claims_data", 0) == 0, c
    else:
        assert c.get("claims_begin", 0) == 0 and c["claims_data"] == 4, c


def test_rooms_too_small_still_resume(backend, make_receiver, sender):
    rx = make_receiver(backend, grow_on_begin=False)
    send_ok(rx, sender, 1)
    desc = rx.open_room(16)  # one block for 40 rows: the handshake path, then resumes
    status, info = sender.send(descriptor_to_builtins(desc), 2, SHAPE)
    assert status == "ok" and info["resumes"] >= 1, info
    assert rx.wait_room(desc.room, 10).embeddings.equal(make_payload(2, *SHAPE).embeddings)


def test_room_aborted_before_its_sender_came_is_free_at_once_and_refused(backend, make_receiver, sender):
    """No sender has claimed it, so nobody can be writing (Mooncake writes only after Ready): the
    blocks go back at once, and the late sender is refused before it writes anything."""
    rx = make_receiver(backend, num_blocks=8, stale_write_guard_s=120)
    victim = rx.open_room(SHAPE[0])
    rx.abort(victim.room, "client went away")
    assert rx.stats()["blocks_free"] == 8 and rx.stats()["blocks_quarantined"] == 0
    other = rx.open_room(8 * 16)  # takes every block, the victim's included
    status, info = sender.send(descriptor_to_builtins(victim), 3, SHAPE)
    assert status == "failed" and "client went away" in info, info
    assert not rx.buffers.embeddings.any(), "a refused sender wrote into the pool"
    rx.abort(other.room)


def test_abort_with_writer_gone_ends_the_quarantine(backend, make_receiver, sender):
    """A Mooncake room aborted mid-write is quarantined until its sender reports back; the owner
    saying the writer is gone (the encoder answered) frees it at once."""
    rx = make_receiver(backend, num_blocks=8, grow_on_begin=False, stale_write_guard_s=120)
    d = rx.open_room(16)
    claimed = lambda: rx.rooms.get(d.room) is not None and rx.rooms.get(d.room).peer is not None  # noqa: E731
    tag = sender.submit(descriptor_to_builtins(d), 4, (100, 50, 64, 3, "float32"))
    wait_until(claimed, what="the sender to claim the room")
    rx.rooms.fail(d.room, "test: failed mid-write", out_of_band_writer=backend == "mooncake")
    sender.result(tag)
    rx.abort(d.room, "encoder answered", writer_gone=True)
    assert rx.stats()["blocks_free"] == 8 and rx.stats()["blocks_quarantined"] == 0
    with pytest.raises(RoomFailed):
        rx.wait_room(d.room, 1)


def test_abandoned_room_fails_and_frees_at_once(backend, make_receiver):
    from transfer import TransferSender

    rx = make_receiver(backend, num_blocks=8, stale_write_guard_s=120)
    d = rx.open_room(SHAPE[0])
    tx = TransferSender()
    try:
        tx.abandon(descriptor_to_builtins(d), "encoder: bad_request: not an image")
        with pytest.raises(RoomFailed, match="not an image"):
            rx.wait_room(d.room, 5)
    finally:
        tx.close()
    assert rx.stats()["blocks_free"] == 8


def test_stale_descriptor_after_restart_on_the_same_port_is_refused(backend, sender):
    """The sender's pooled connection talked to receiver A; A closes and B binds the same control
    port. A descriptor of A reaches B (the connection reconnects), which refuses it: Mooncake by the
    handshake before any write, ZMQ on the claim that comes with its frames (dropped unread)."""
    spec = BufferSpec(hidden=64, num_deepstack=3, block_size=16, num_blocks=16)
    a = TransferReceiver(spec, ReceiverSettings(backend=backend))
    port = int(a.control.rsplit(":", 1)[1])
    send_ok(a, sender, 1)
    stale = descriptor_to_builtins(a.open_room(SHAPE[0]))
    a.close()
    b = once_port_free(
        lambda: TransferReceiver(spec, ReceiverSettings(backend=backend, control_port=port)), f"port {port}"
    )
    try:
        status, info = sender.send(stale, 2, SHAPE, deadline_s=5)
        assert status == "failed" and "another receiver" in info, info
        assert b.stats()["refused_begin" if backend == "mooncake" else "refused_data"] == 1, b.stats()
        assert b.stats()["blocks_free"] == 16
        send_ok(b, sender, 3)  # and B serves new descriptors normally
    finally:
        b.close()
