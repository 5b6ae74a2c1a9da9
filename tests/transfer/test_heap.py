"""The receiver keeps its freed heap (`transfer/heap.py`): the buffers libzmq mallocs for each
received message are reused room after room instead of being faulted in afresh. Measured as page
faults of a receiver process (a fresh one per setting: the malloc settings are per process) while a
real sender pushes 8 MiB rooms over ZMQ.

With the heap kept, a receiver faults in its peak once and reuses it: how far ahead of the copies
libzmq receives decides that peak, and it grows whenever a noisy scheduler lets the receive run
further ahead than ever before (a room of ~250-800 faults now and then, at any point of the run), but
never past what one room holds (plus the process's own first-room allocations). So the test bounds
the total over all the rooms by twice one room's pages, not any single room; glibc's default faults
each room's messages in afresh, so its total grows with the number of rooms (7000-15000 over 24
rooms here, against 1000-2400 kept)."""

from __future__ import annotations

import multiprocessing as mp
import resource

from transfer import BufferSpec, ReceiverSettings, TransferReceiver, descriptor_to_builtins

SHAPE = (520, 512, 1024, 3, "float32")  # 512 vision rows of 4 x 1024 fp32: ~8 MiB a room
ROOMS = 32
ROOM_PAGES = SHAPE[1] * SHAPE[2] * 4 * (1 + SHAPE[3]) // 4096  # a room's rows, in 4 KiB pages


def receive(conn, keep_bytes: int) -> None:
    spec = BufferSpec(hidden=1024, num_deepstack=3, block_size=64, num_blocks=16)
    rx = TransferReceiver(spec, ReceiverSettings(backend="zmq", keep_freed_heap_bytes=keep_bytes))
    faults = []
    for _ in range(ROOMS):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        d = rx.open_room(SHAPE[0])
        conn.send(descriptor_to_builtins(d))
        rx.wait_room(d.room, 60).release()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    rx.close()
    conn.send(faults)


def room_faults(sender, keep_bytes: int) -> list[int]:
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=receive, args=(theirs, keep_bytes), daemon=True)
    p.start()
    try:
        for seed in range(ROOMS):
            assert mine.poll(120), "the receiver process did not open a room"
            status, out = sender.send(mine.recv(), seed, SHAPE)
            assert status == "ok", out
        assert mine.poll(60)
        return mine.recv()
    finally:
        p.join(10)
        if p.is_alive():
            p.kill()


def test_received_messages_reuse_the_heap(sender):
    kept = room_faults(sender, 128 * 2**20)
    default = room_faults(sender, 0)
    print(f"page faults per 8 MiB room: kept {kept}, glibc's default {default}")
    assert sum(kept) < 2 * ROOM_PAGES, (
        f"{ROOMS} rooms with the heap kept faulted in {sum(kept)} pages, more than twice the "
        f"{ROOM_PAGES} of one room: {kept}"
    )
    assert sum(default) > 2 * sum(kept), (
        f"glibc's default should fault the messages in again (kept {kept}, default {default}): "
        "the premise of transfer/heap.py no longer holds here"
    )
