"""Claiming a room ahead of its rows (`TransferSender.claim`, what an encoder does once it knows the
row count): the rows arrive as without a claim, the room grows at the claim, and the ways a claimed
room ends early — the encoder abandons it, or the language side aborts it while the vision tower
still runs — free every block without waiting for the stale-write guard."""

from __future__ import annotations

import pytest

from tests.transfer.conftest import BACKENDS, wait_until
from tests.transfer.peer import make_payload
from tests.transfer.test_transfer import check_equal
from transfer import RoomFailed, TransferSender, descriptor_to_builtins

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", BACKENDS)]
SHAPE = (40, 20, 64, 3, "float32")


def test_claimed_room_gets_the_same_rows(backend, make_receiver, sender):
    rx = make_receiver(backend, stale_write_guard_s=120)
    for seed in range(3):
        d = rx.open_room(SHAPE[0])
        status, info = sender.result(sender.submit(descriptor_to_builtins(d), seed, SHAPE, claim_s=0.05))
        assert status == "ok", info
        check_equal(rx.wait_room(d.room, 10), make_payload(seed, *SHAPE))
        rx.release(d.room)
    c = rx.stats()
    # Mooncake: one Begin per room, sent ahead; ZMQ needs no claim (its rows claim the room)
    assert c.get("claims_begin", 0) == (3 if backend == "mooncake" else 0), c
    assert c["blocks_free"] == c["blocks_total"], c


def test_claim_announces_the_rows_so_the_room_grows_without_a_resume(backend, make_receiver, sender):
    rx = make_receiver(backend)
    d = rx.open_room(16)  # one block for 100 rows
    shape = (100, 50, 64, 3, "float32")
    status, info = sender.result(sender.submit(descriptor_to_builtins(d), 7, shape, claim_s=0.05))
    assert status == "ok", info
    check_equal(rx.wait_room(d.room, 10), make_payload(7, *shape))
    # Mooncake grew the room when the claim arrived; ZMQ grows it at its own handshake
    assert info["resumes"] == 0 and rx.stats().get("resumes", 0) == 0, (info, rx.stats())


def test_abandoned_claim_frees_the_room_at_once(backend, make_receiver, sender):
    rx = make_receiver(backend, num_blocks=8, stale_write_guard_s=120)
    d = rx.open_room(SHAPE[0])
    status, claimed = sender.result(
        sender.submit(descriptor_to_builtins(d), 1, SHAPE, claim_s=0.05, abandon=True)
    )
    assert status == "abandoned" and claimed == (backend == "mooncake")
    with pytest.raises(RoomFailed, match="gave up"):
        rx.wait_room(d.room, 5)
    wait_until(lambda: rx.stats()["blocks_free"] == 8, 5, "the abandoned room's blocks")
    assert rx.stats()["blocks_quarantined"] == 0


def test_room_aborted_while_claimed_frees_once_the_sender_comes(backend, make_receiver, sender):
    """Aborted between claim and rows (the client left while the vision tower ran): Mooncake cannot
    know whether a write is on its way, so the blocks wait in quarantine — until the sender reaches
    its send, reads the abort, writes nothing and says so; not until the guard time."""
    rx = make_receiver(backend, num_blocks=8, stale_write_guard_s=120)
    d = rx.open_room(SHAPE[0])
    claimed = lambda: rx.rooms.get(d.room) is not None and rx.rooms.get(d.room).peer is not None  # noqa: E731
    tag = sender.submit(descriptor_to_builtins(d), 2, SHAPE, claim_s=1.0)
    if backend == "mooncake":
        wait_until(claimed, 5, "the claim")
    rx.abort(d.room, "client went away")
    status, info = sender.result(tag)
    assert status == "failed" and "client went away" in info, info
    wait_until(lambda: rx.stats()["blocks_free"] == 8, 5, "the aborted room's blocks")
    assert rx.stats()["blocks_quarantined"] == 0
    assert not rx.buffers.embeddings.any(), "rows were written into an aborted room"


def test_claim_for_another_row_count_fails_the_send(backend, make_receiver):
    rx = make_receiver(backend, num_blocks=8)
    d = rx.open_room(SHAPE[0])
    tx = TransferSender()
    try:
        claimed = tx.claim(descriptor_to_builtins(d), 10)
        assert claimed == (backend == "mooncake")
        if not claimed:  # ZMQ: nothing to contradict, the rows go as usual
            assert tx.send(descriptor_to_builtins(d), make_payload(3, *SHAPE)).rows == SHAPE[0]
            return
        with pytest.raises(Exception, match="claimed for 10 rows"):
            tx.send(descriptor_to_builtins(d), make_payload(3, *SHAPE))
        with pytest.raises(RoomFailed):
            rx.wait_room(d.room, 5)
        wait_until(lambda: rx.stats()["blocks_free"] == 8, 5, "the failed room's blocks")
    finally:
        tx.close()
