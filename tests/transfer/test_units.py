"""Unit tests of the pieces without sockets: allocator, row runs, buffer reads, messages, aux, ZMQ
message grouping, and the Mooncake write's bookkeeping around a scripted engine."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import zmq

from transfer import BlockAllocator, BufferSpec, MultimodalDataBuffers, PoolExhausted
from transfer import messages as m
from transfer.backends.base import TransferError, Write, WriteInFlight
from transfer.buffers import Run, runs
from transfer.payload import AuxRecord
from transfer.rooms import Room


def test_allocator_prefers_consecutive_runs_and_extension():
    a = BlockAllocator(10)
    x = a.try_alloc(3)
    y = a.try_alloc(2)
    assert x == [0, 1, 2] and y == [3, 4]
    a.free([1])
    assert a.try_alloc(2) == [5, 6]  # a run, not the hole at 1
    assert a.try_alloc(1, after=6) == [7]
    assert a.try_alloc(4) is None and a.num_free == 3
    assert sorted(a.try_alloc(3)) == [1, 8, 9]  # no run of 3 left: any blocks


def test_allocator_double_free_and_range():
    a = BlockAllocator(4)
    got = a.try_alloc(2)
    a.free(got)
    with pytest.raises(ValueError, match="twice"):
        a.free([got[0]])
    with pytest.raises(ValueError, match="outside"):
        a.free([9])


def test_allocator_waits_bounded_and_wakes_on_free():
    a = BlockAllocator(2)
    held = a.try_alloc(2)
    with pytest.raises(PoolExhausted):
        a.alloc(1, timeout_s=0.05)
    with pytest.raises(PoolExhausted, match="in all"):
        a.alloc(3, timeout_s=5)
    threading.Timer(0.1, a.free, args=(held,)).start()
    t = time.monotonic()
    assert len(a.alloc(2, timeout_s=5)) == 2 and time.monotonic() - t < 4


def test_runs_merge_consecutive_blocks():
    assert runs([4, 5, 9], 8, 0, 20) == [Run(0, 32, 16), Run(16, 72, 4)]
    assert runs([4, 5, 9], 8, 10, 17) == [Run(10, 42, 6), Run(16, 72, 1)]
    assert runs([2], 8, 3, 3) == []


def test_a_room_takes_each_buffers_rows_in_request_order_and_counts_them():
    room = Room("r", [5, 2], deadline=0.0)  # request rows 0..3 in block 5, 4..7 in block 2
    assert room.take_rows("embeddings", 8, 11, 4) == "embeddings rows 0..4 never arrived"  # block 2 first
    assert room.take_rows("embeddings", 20, 24, 4) is None  # block 5: request rows 0..3
    assert room.rows_missing("embeddings", 4) is None
    assert room.rows_missing("embeddings", 7) == "embeddings rows 4..7 never arrived"
    assert room.take_rows("embeddings", 21, 22, 4) == "embeddings rows 1..2 arrived twice"
    assert room.take_rows("embeddings", 8, 11, 4) is None
    room.blocks.append(9)  # a resume: request rows 8..11 in block 9
    assert room.take_rows("embeddings", 11, 12, 4) is None and room.take_rows("embeddings", 36, 40, 4) is None
    assert room.rows_missing("embeddings", 12) is None
    assert room.rows_missing("embeddings", 10) == "embeddings rows 10..12 are beyond the sealed 10"
    assert room.rows_missing("deepstack", 0) is None and room.next_row == {"embeddings": 12}
    room = Room("r", [10, 11, 13, 12], deadline=0.0)  # blocks 11..13 are consecutive in the pool only
    assert room.take_rows("fill_ids", 40, 44, 4) is None
    assert (
        room.take_rows("fill_ids", 44, 56, 4)
        == "fill_ids pool rows 44..56 span blocks out of the room's order"
    )
    assert room.take_rows("fill_ids", 44, 48, 4) is None and room.next_row["fill_ids"] == 8


def test_read_gives_views_for_consecutive_blocks_and_copies_otherwise():
    spec = BufferSpec(hidden=4, num_deepstack=2, block_size=2, num_blocks=8)
    b = MultimodalDataBuffers(spec)
    b.fill_ids.copy_(torch.arange(16))
    b.embeddings.copy_(torch.arange(16).float()[:, None].expand(16, 4))
    r = b.read([2, 3], total_rows=3, vision_rows=2)
    assert r["fill_ids"].tolist() == [4, 5, 6] and r["fill_ids"].data_ptr() == b.fill_ids[4:].data_ptr()
    r = b.read([5, 1], total_rows=4, vision_rows=3)
    assert r["fill_ids"].tolist() == [10, 11, 2, 3] and r["embeddings"][:, 0].tolist() == [10, 11, 2]
    assert r["deepstack"].shape == (3, 8)
    with pytest.raises(ValueError, match="outside"):
        b.byte_view("fill_ids", 60, 8)


def test_messages_roundtrip_and_validation():
    msg = m.Resume(room="r", block_ids=[1, 2], sent_rows=16)
    assert m.decode(m.encode(msg)) == msg
    with pytest.raises(m.BadMessage, match="version"):
        m.decode(m.encode(m.Ack(room="r", ok=True, v=m.VERSION + 1)))
    with pytest.raises(m.BadMessage):
        m.decode(b"\x93\x01\x02")
    with pytest.raises(m.BadMessage, match="descriptor"):
        m.descriptor_from_builtins({"room": "r"})
    status = m.Status(room="r", waiting="ack")
    assert m.decode(m.encode(status)) == status
    with pytest.raises(m.BadMessage, match="waits for 'done'"):
        m.decode(m.encode(m.Status(room="r", waiting="done")))


def test_aux_record_pack_unpack():
    rec = AuxRecord(room_tag=-5, total_rows=10, vision_rows=4, mrope_delta=-3, num_images=1, checksum=77)
    assert AuxRecord.unpack(rec.pack()) == rec
    assert AuxRecord.unpack(torch.zeros(16, dtype=torch.int32)) is None


def test_mooncake_split_cuts_large_ranges_into_similar_pieces():
    from transfer.backends.mooncake_backend import split

    writes = [(1000, 5000, 64), (10_000, 90_000, 3 << 20), (20_000_000, 7_000_000, 1 << 20), (9, 99, 16)]
    srcs, dsts, lens = split(writes, pieces=4, min_piece=256 << 10)
    total = sum(n for *_, n in writes)
    assert sum(lens) == total and len(srcs) == len(dsts) == len(lens)
    covered = sorted(zip(srcs, dsts, lens, strict=True))
    for s, d, n in writes:  # every range is covered exactly, in order, offsets kept
        mine = [(a, b, k) for a, b, k in covered if s <= a < s + n]
        assert sum(k for *_, k in mine) == n
        assert all(b - d == a - s for a, b, _ in mine)
    big = [k for k in lens if k > 64 and k != 16]
    assert len(big) == 4 and max(big) <= total // 4 + 1 and min(big) >= 256 << 10, lens
    # small batches stay whole: nothing is cut below min_piece
    assert split([(0, 0, 300 << 10)], pieces=4, min_piece=256 << 10)[2] == [300 << 10]


class _RecordingSocket:
    """Collects what the ZMQ sender hands its socket, message by message."""

    def __init__(self) -> None:
        self.messages: list[list] = [[]]

    def send(self, data, flags=0, copy=True):
        self.messages[-1].append(bytes(data))
        if not flags & zmq.SNDMORE:
            self.messages.append([])


def _zmq_messages(sizes: dict[str, int], row_bytes: dict[str, int], done):
    from transfer.backends.base import Write
    from transfer.backends.zmq_backend import ZmqSender

    sock = _RecordingSocket()
    desc = SimpleNamespace(
        receiver_id="rx", buffers={n: SimpleNamespace(row_bytes=rb) for n, rb in row_bytes.items()}
    )
    writes = [Write(n, 0, np.full(k, i, np.uint8)) for i, (n, k) in enumerate(sizes.items())]
    ZmqSender().write(SimpleNamespace(sock=sock), desc, "r1", writes, claim=7, done=done)
    out = []
    for msg in sock.messages[:-1]:
        head = m.decode(msg[0])
        assert [s[2] for s in head.segments] == [len(f) for f in msg[1:]]
        out.append((head, msg[1:]))
    return out


def test_zmq_rows_go_in_about_one_mib_messages_and_the_seal_rides_with_the_last():
    from transfer.backends.zmq_backend import FRAME_BYTES, TAIL_BYTES

    done = m.Done(room="r1", total_rows=1, vision_rows=1, mrope_delta=0, num_images=0, checksum=0)
    rb = {"fill_ids": 4, "embeddings": 8192, "deepstack": 24576, "aux": 64}
    # one room of ~1 MiB: one message, claimed and sealed by it, the aux record included
    small = {"fill_ids": 128, "embeddings": 32 * 8192, "deepstack": 32 * 24576, "aux": 64}
    ((head, frames),) = _zmq_messages(small, rb, done)
    assert head.receiver_id == "rx" and head.total_rows == 7 and head.done == done
    assert [s[0] for s in head.segments] == list(small) and sum(map(len, frames)) == sum(small.values())
    # 8 MiB: ~1 MiB messages of whole rows; only the first claims, only the last seals
    big = {"fill_ids": 1024, "embeddings": 256 * 8192, "deepstack": 256 * 24576, "aux": 64}
    msgs = _zmq_messages(big, rb, done)
    assert len(msgs) == 8
    assert [h.receiver_id for h, _ in msgs] == ["rx"] + [""] * (len(msgs) - 1)
    assert [h.done for h, _ in msgs] == [None] * (len(msgs) - 1) + [done]
    assert msgs[-1][0].segments[-1][0] == "aux"
    for head, frames in msgs:
        assert sum(map(len, frames)) <= FRAME_BYTES + TAIL_BYTES
        for (name, offset, n), f in zip(head.segments, frames, strict=True):
            assert offset % rb[name] == 0 and n % rb[name] == 0 and len(set(f)) == 1
    got = {}
    for head, _ in msgs:
        for name, offset, n in head.segments:
            got.setdefault(name, []).append((offset, n))
    for name, k in big.items():  # every byte once, in order
        spans = got[name]
        assert spans[0][0] == 0 and sum(n for _, n in spans) == k
        assert all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:], strict=False))


class _ScriptedEngine:
    """Stands in for Mooncake's engine: the k-th submitted piece answers `outcomes[k]` (default 1) to
    `transfer_check_status` (0 waiting, -2 overdue, 1 done, -1 failed); `status` can be changed;
    registrations are counted."""

    def __init__(self, outcomes=(), refuse_submit_after: int = 99) -> None:
        self.status: dict[int, int] = {}
        self.registered: list[int] = []
        self.outcomes, self.refuse_after = list(outcomes), refuse_submit_after

    def transfer_submit_write(self, session, src, dst, n):
        k = len(self.status)
        if k >= self.refuse_after:
            return 0
        self.status[k + 1] = self.outcomes[k] if k < len(self.outcomes) else 1
        return k + 1

    def transfer_check_status(self, handle):
        return self.status[handle]

    def register_memory(self, addr, n):
        self.registered.append(addr)
        return 0

    def unregister_memory(self, addr):
        self.registered.remove(addr)


def _rdma_sender(engine, retries: int = 1):
    """A Mooncake sender (RDMA: sources registered) around a scripted engine, in 16 KiB pieces."""
    from transfer import SenderSettings
    from transfer.backends.mooncake_backend import MooncakeSender

    s = SenderSettings(
        mooncake_protocol="rdma", mooncake_min_piece_bytes=4096, mooncake_write_retries=retries
    )
    tx = MooncakeSender(s, engine=engine)
    tx.timeout_s = 0.05
    desc = SimpleNamespace(session="peer", buffers={"embeddings": SimpleNamespace(addr=1 << 30)})
    return tx, desc, [Write("embeddings", 0, np.zeros(64 << 10, np.uint8))]


def test_mooncake_write_that_cannot_start_every_piece_waits_for_the_rest_and_unregisters():
    eng = _ScriptedEngine(refuse_submit_after=2)
    tx, desc, writes = _rdma_sender(eng)
    with pytest.raises(TransferError, match="could not start"):
        tx.write(None, desc, "r", writes)
    assert len(eng.status) == 2 and eng.registered == []  # the two that started were waited for


def test_mooncake_pieces_that_failed_are_sent_again_once():
    eng = _ScriptedEngine(outcomes=[1, -1, 1, -1])
    tx, desc, writes = _rdma_sender(eng)
    tx.write(None, desc, "r", writes)  # pieces 2 and 4 failed, went again, landed
    assert len(eng.status) == 6 and eng.registered == []
    eng = _ScriptedEngine(outcomes=[1, -1, 1, 1, -1])
    tx, desc, writes = _rdma_sender(eng)
    with pytest.raises(TransferError, match=r"failed \(1 of 4 pieces\)"):
        tx.write(None, desc, "r", writes)  # piece 2 failed twice
    assert len(eng.status) == 5 and eng.registered == []
    tx, desc, writes = _rdma_sender(_ScriptedEngine(outcomes=[-1]), retries=0)
    with pytest.raises(TransferError, match=r"failed \(1 of 4 pieces\)"):
        tx.write(None, desc, "r", writes)


def test_mooncake_write_overdue_past_the_budget_is_in_flight_and_keeps_its_sources():
    eng = _ScriptedEngine(outcomes=[-2] * 4)
    tx, desc, writes = _rdma_sender(eng)
    with pytest.raises(WriteInFlight) as e:
        tx.write(None, desc, "r", writes)
    assert len(e.value.pending) == 4  # overdue is not over: its bytes may still land
    src = writes[0].src
    assert eng.registered == [src.ctypes.data] and tx._stuck[0][1][0] is src
    tx._reap()
    assert len(tx._stuck) == 1  # still moving
    for h in eng.status:
        eng.status[h] = 1
    tx._reap()
    assert tx._stuck == [] and eng.registered == []


def test_an_aborting_sender_lets_its_abort_out_before_the_connection_goes():
    from transfer.sender import TransferSender

    class Sock:
        def __init__(self):
            self.calls = []

        def send(self, data, flags=0):
            self.calls.append(("send", m.decode(data)))

        def close(self, linger=None):
            self.calls.append(("close", linger))

    conn = SimpleNamespace(sock=Sock())
    conn.close = lambda linger_ms=0: conn.sock.close(linger_ms)
    TransferSender._abort(None, conn, "r1", "encoder gave up")
    (what, msg), (closed, linger) = conn.sock.calls
    assert what == "send" and isinstance(msg, m.Abort) and msg.room == "r1"
    assert closed == "close" and linger >= 100  # 0 would drop the queued Abort
