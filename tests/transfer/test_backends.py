"""Backend contracts with real engines: work handed to `write` as `while_writing` runs while the bytes
move, and a failure in it never lets an out-of-band write outlive the call; a write the receiver
cannot take fails without spoiling the next (whose pieces may meet a reset connection and are sent
again); a write given up while its bytes may still be moving keeps the room's blocks quarantined."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.transfer.peer import make_payload
from transfer import RoomFailed, TransferFailed, TransferSender, descriptor_to_builtins
from transfer.backends.base import TransferError, Write

pytestmark = pytest.mark.slow


@pytest.fixture
def block(make_receiver):
    """A Mooncake receiver with a room of one 4 MiB block, a sender's backend, and 4 MiB of random
    rows with where they go (`offset`) and a view of the pool there (`landed()`)."""
    rx = make_receiver("mooncake", hidden=4096, num_deepstack=1, block_size=256, num_blocks=2)
    d = rx.open_room(256)
    tx = TransferSender()
    rb = d.buffers["embeddings"].row_bytes
    offset = d.block_ids[0] * 256 * rb
    src = np.random.default_rng(0).integers(1, 255, 256 * rb, dtype=np.uint8)
    pool = rx.buffers.embeddings.view(-1).view(torch.uint8)
    yield SimpleNamespace(
        rx=rx,
        d=d,
        tx=tx,
        backend=tx.backend("mooncake"),
        src=src,
        offset=offset,
        landed=lambda n=src.nbytes: pool[offset : offset + n],
    )
    tx.close()


def test_mooncake_write_waits_for_its_bytes_even_when_the_work_beside_it_fails(block):
    b, calls = block, []
    conn = b.tx._get(b.d.control)

    def fail():
        calls.append(bytes(b.landed(8)))
        raise RuntimeError("work beside the write failed")

    with pytest.raises(RuntimeError, match="beside the write"):
        b.backend.write(conn, b.d, b.d.room, [Write("embeddings", b.offset, b.src)], while_writing=fail)
    # the work ran while the write was under way, and the call returned only once it had landed
    assert len(calls) == 1
    assert torch.equal(b.landed(), torch.from_numpy(b.src))
    # and with nothing to write, the work still runs
    b.backend.write(conn, b.d, b.d.room, [], while_writing=lambda: calls.append(b""))
    assert len(calls) == 2
    conn.close()


def test_mooncake_write_the_receiver_cannot_take_fails_and_the_next_one_lands(block):
    b = block
    beyond = b.rx.buffers.embeddings.numel() * 4  # just past the registered region
    with pytest.raises(TransferError, match="failed"):
        b.backend.write(None, b.d, b.d.room, [Write("embeddings", beyond, b.src)])
    # the receiver may have reset the connections that carried the refused pieces: the next write's
    # pieces that meet one fail, and are sent again (mooncake_write_retries) on new ones
    b.backend.write(None, b.d, b.d.room, [Write("embeddings", b.offset, b.src)])
    assert torch.equal(b.landed(), torch.from_numpy(b.src))


class _HeldEngine:
    """A real Mooncake engine whose status calls say "still moving" while `held` (a write stalled in
    the network, as far as the sender can tell)."""

    def __init__(self, engine) -> None:
        self.engine, self.held = engine, True

    def transfer_check_status(self, batch):
        return 0 if self.held else self.engine.transfer_check_status(batch)

    def __getattr__(self, name):
        return getattr(self.engine, name)


def test_a_write_given_up_while_moving_keeps_the_room_quarantined(make_receiver):
    rx = make_receiver("mooncake", num_blocks=8, room_ttl_s=0.5, stale_write_guard_s=120)
    d = rx.open_room(40)
    tx = TransferSender()
    try:
        backend = tx.backend("mooncake")
        backend.engine, backend.timeout_s = _HeldEngine(backend.engine), 0.2
        with pytest.raises(TransferFailed, match="still moving"):
            tx.send(descriptor_to_builtins(d), make_payload(3, 40, 20, 64, 3, "float32"))
        # the sender said nothing more (its bytes may still land), so once the room's deadline
        # passed its blocks stay out of the pool: not freed as after an Abort
        with pytest.raises(RoomFailed, match="deadline"):
            rx.wait_room(d.room, 5)
        assert rx.stats()["blocks_quarantined"] == len(d.block_ids)
        # the sources of the given-up write stay alive until its pieces end; the next write lets go
        assert len(backend._stuck) == 1
        backend.engine.held = False
        d2 = rx.open_room(40)
        tx.send(descriptor_to_builtins(d2), make_payload(4, 40, 20, 64, 3, "float32"))
        assert backend._stuck == []
        assert rx.stats()["blocks_quarantined"] == len(d.block_ids)
    finally:
        tx.close()
