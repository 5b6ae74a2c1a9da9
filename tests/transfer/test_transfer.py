"""Real transfers between two processes on loopback, for both backends: exactness, concurrency,
resume, back-pressure, and a sender killed mid-transfer."""

from __future__ import annotations

import pytest
import torch

from tests.transfer.conftest import BACKENDS, wait_until
from tests.transfer.peer import SenderProcess, make_payload
from transfer import PoolExhausted, RoomFailed, descriptor_to_builtins

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", BACKENDS)]


def check_equal(got, want) -> None:
    assert got.fill_ids.dtype == torch.int32 and torch.equal(got.fill_ids.long(), want.fill_ids)
    assert torch.equal(got.positions.long(), want.mrope)
    assert got.embeddings.dtype == want.embeddings.dtype
    assert torch.equal(got.embeddings.view(torch.uint8), want.embeddings.view(torch.uint8))
    assert torch.equal(got.deepstack.view(torch.uint8), want.deepstack.view(torch.uint8))
    assert got.mrope_delta == want.mrope_delta and got.num_images == want.num_images


def roundtrip(rx, sender, seed, shape, rows_hint=None):
    desc = rx.open_room(shape[0] if rows_hint is None else rows_hint)
    status, info = sender.send(descriptor_to_builtins(desc), seed, shape)
    assert status == "ok", info
    got = rx.wait_room(desc.room, 10)
    check_equal(got, make_payload(seed, *shape))
    return got, info


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_bit_exact_random_shapes(backend, dtype, make_receiver, sender):
    rx = make_receiver(backend, dtype=dtype, hidden=96, num_deepstack=2, block_size=8, num_blocks=128)
    g = torch.Generator().manual_seed(1)
    for seed in range(8):
        n = int(torch.randint(1, 400, (1,), generator=g))
        v = int(torch.randint(0, n + 1, (1,), generator=g))
        got, _ = roundtrip(rx, sender, seed, (n, v, 96, 2, dtype))
        got.release()
    assert rx.stats()["blocks_used"] == 0


def test_no_deepstack_and_text_only_rows(backend, make_receiver, sender):
    rx = make_receiver(backend, num_deepstack=0)
    got, _ = roundtrip(rx, sender, 3, (40, 0, 64, 0, "float32"))
    assert got.embeddings.shape == (0, 64) and got.deepstack.shape == (0, 0)
    got.release()


def test_many_concurrent_rooms(backend, make_receiver, sender):
    rx = make_receiver(backend, num_blocks=320)
    shapes = {s: (20 + 7 * s, 10 + 3 * s, 64, 3, "float32") for s in range(32)}
    descs = {s: rx.open_room(shapes[s][0]) for s in shapes}
    tags = {s: sender.submit(descriptor_to_builtins(descs[s]), s, shapes[s]) for s in shapes}
    for s, tag in tags.items():
        status, info = sender.result(tag)
        assert status == "ok", info
        got = rx.wait_room(descs[s].room, 10)
        check_equal(got, make_payload(s, *shapes[s]))
        got.release()
    assert rx.stats()["blocks_used"] == 0 and rx.stats()["done"] == 32


@pytest.mark.parametrize("grow_on_begin", [False, True])
def test_resume_is_bit_identical_to_one_shot(backend, grow_on_begin, make_receiver, sender):
    rx = make_receiver(backend, grow_on_begin=grow_on_begin)
    shape = (300, 250, 64, 3, "float32")  # 19 blocks of 16 rows
    once, info1 = roundtrip(rx, sender, 7, shape)
    assert info1["resumes"] == 0
    resumed, info2 = roundtrip(rx, sender, 7, shape, rows_hint=16)  # one block first
    assert info2["resumes"] == (0 if grow_on_begin else 1)
    for a, b in [
        (once.fill_ids, resumed.fill_ids),
        (once.embeddings, resumed.embeddings),
        (once.deepstack, resumed.deepstack),
        (once.positions, resumed.positions),
    ]:
        assert torch.equal(a, b)
    once.release()
    resumed.release()
    assert rx.stats()["blocks_used"] == 0


def test_full_pool_is_back_pressure_not_failure(backend, make_receiver, sender):
    rx = make_receiver(backend, num_blocks=8, grow_on_begin=False)
    a = rx.open_room(16 * 6)  # 6 of 8 blocks
    b = rx.open_room(16)  # 7
    with pytest.raises(PoolExhausted):
        rx.open_room(16 * 2, timeout_s=0.2)
    # b needs 4 blocks in all: it writes its first, asks to resume, and waits while a holds the pool
    tag = sender.submit(descriptor_to_builtins(b), 11, (60, 30, 64, 3, "float32"))
    wait_until(lambda: rx.rooms.get(b.room).want is not None, what="the resume request")
    rx.abort(a.room, "test frees the pool")
    status, info = sender.result(tag)
    assert status == "ok" and info["resumes"] == 1, info
    got = rx.wait_room(b.room, 10)
    check_equal(got, make_payload(11, 60, 30, 64, 3, "float32"))
    got.release()
    wait_until(lambda: rx.stats()["blocks_used"] == 0, what="all blocks free")


def test_room_larger_than_pool_fails_cleanly(backend, make_receiver, sender):
    rx = make_receiver(backend, num_blocks=4, grow_on_begin=False)
    d = rx.open_room(16)
    status, info = sender.send(descriptor_to_builtins(d), 1, (200, 10, 64, 3, "float32"))
    assert status == "failed" and "pool has 4" in info
    with pytest.raises(RoomFailed):
        rx.wait_room(d.room, 5)
    wait_until(lambda: rx.stats()["blocks_used"] == 0, what="blocks back")


def test_sender_killed_mid_transfer_fails_room_and_frees_blocks(backend, make_receiver):
    rx = make_receiver(backend, num_blocks=8, room_ttl_s=3, grow_on_begin=False)
    peer = SenderProcess()
    hog = rx.open_room(16 * 7)
    victim = rx.open_room(16)  # pool now full: the victim's resume will wait
    try:
        peer.submit(descriptor_to_builtins(victim), 5, (100, 50, 64, 3, "float32"))
        wait_until(
            lambda: rx.rooms.get(victim.room).want is not None, what="the victim to stall mid-transfer"
        )
        peer.kill()
    finally:
        peer.close()
    with pytest.raises(RoomFailed, match="deadline"):
        rx.wait_room(victim.room, 5)
    rx.abort(hog.room)
    wait_until(lambda: rx.stats()["blocks_free"] == 8, what="the pool back to full")


def test_receiver_restart_is_refused(backend, make_receiver, sender):
    rx = make_receiver(backend)
    d = descriptor_to_builtins(rx.open_room(16))
    d["receiver_id"] = "0" * 32  # a descriptor from a previous incarnation
    status, info = sender.send(d, 1, (10, 5, 64, 3, "float32"))
    assert status == "failed" and "another receiver" in info
    with pytest.raises(RoomFailed):
        rx.wait_room(d["room"], 5)


def test_blocks_of_an_aborted_room_return_once_its_sender_stops(backend, make_receiver, sender):
    """Mooncake writes bypass the receiver: an aborted room's blocks wait for its sender to report back
    (not for the long guard time); ZMQ frees them at once."""
    rx = make_receiver(backend, num_blocks=8, grow_on_begin=False, stale_write_guard_s=120)
    hog = rx.open_room(16 * 7)
    victim = rx.open_room(16)
    tag = sender.submit(descriptor_to_builtins(victim), 8, (100, 50, 64, 3, "float32"))
    stalled = lambda: getattr(rx.rooms.get(victim.room), "want", None) is not None  # noqa: E731
    wait_until(stalled, what="the victim to wait for a resume")
    rx.abort(victim.room, "client went away")
    status, info = sender.result(tag)
    assert status == "failed" and "client went away" in info
    rx.abort(hog.room)
    wait_until(lambda: rx.stats()["blocks_free"] == 8, timeout=10, what="the pool back to full")
    assert rx.stats().get("quarantine_timeouts", 0) == 0
