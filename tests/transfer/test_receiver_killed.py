"""A receiver process killed mid-transfer: the sender reports the room failed as soon as it sees the
connection reset (long before its deadline), never hangs, and goes on serving other receivers. The
receiver kills itself (SIGKILL) at a chosen point of a real room: while the rows are moving, or while
the room waits for a resume."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.transfer.conftest import BACKENDS
from tests.transfer.peer import make_payload
from transfer import (
    BufferSpec,
    ReceiverSettings,
    TransferFailed,
    TransferReceiver,
    TransferSender,
    descriptor_to_builtins,
)
from transfer.rooms import State

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", BACKENDS)]
HIDDEN, NDS, BLOCK = 1024, 3, 64
DEADLINE_S = 20.0
SPEC = BufferSpec(hidden=HIDDEN, num_deepstack=NDS, block_size=BLOCK, num_blocks=32)


def dying_receiver(conn, backend: str, when: str, rows: int) -> None:
    """Open a room for `rows`, hand its descriptor over, then SIGKILL this process once the room is
    receiving (`moving`, a few ms into its rows) or waiting for blocks to resume (`resume`)."""
    rx = TransferReceiver(SPEC, ReceiverSettings(backend=backend, grow_on_begin=False))
    if when == "resume":
        rx.open_room(BLOCK * 30)  # the pool is left with 2 blocks: the room's resume must wait
    d = rx.open_room(BLOCK * 2 if when == "resume" else rows)
    conn.send(descriptor_to_builtins(d))
    while True:
        r = rx.rooms.get(d.room)
        if r is not None and r.state is State.RECEIVING and (when == "moving" or r.want is not None):
            if when == "moving":
                time.sleep(0.003)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.0005)


def start(backend: str, when: str, rows: int):
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=dying_receiver, args=(theirs, backend, when, rows), daemon=True)
    p.start()
    assert mine.poll(120), "the receiver process did not start"
    return p, mine.recv()


@pytest.mark.parametrize("when", ["moving", "resume"])
def test_sender_reports_a_killed_receiver_within_the_deadline(backend, when):
    rows = BLOCK * 30  # 30 x 16 KiB rows: ~30 MiB, tens of ms on the wire here
    payload = make_payload(3, rows, rows, HIDDEN, NDS, "float32")
    sender = TransferSender()
    p, desc = start(backend, when, rows)
    try:
        t = time.monotonic()
        with ThreadPoolExecutor(1) as pool, pytest.raises(TransferFailed) as failed:
            pool.submit(sender.send, desc, payload, deadline_s=DEADLINE_S).result(DEADLINE_S + 10)
        took = time.monotonic() - t
        print(f"{backend}/{when}: failed after {took:.2f}s: {failed.value}")
        p.join(10)
        assert p.exitcode == -signal.SIGKILL, "the receiver was not killed mid-transfer"
        assert took < DEADLINE_S / 4, f"the sender took {took:.1f}s to report a dead receiver"
        # the sender still serves: a fresh receiver gets a room right after
        rx = TransferReceiver(SPEC, ReceiverSettings(backend=backend))
        try:
            small = make_payload(4, 100, 40, HIDDEN, NDS, "float32")
            d = rx.open_room(100)
            res = sender.send(d, small, deadline_s=DEADLINE_S)
            got = rx.wait_room(d.room, 10)
            assert res.rows == 100 and got.fill_ids.tolist() == small.fill_ids.tolist()
            got.release()
        finally:
            rx.close()
    finally:
        if p.is_alive():
            p.kill()
        sender.close()
