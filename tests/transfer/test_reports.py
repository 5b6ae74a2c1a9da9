"""What ends a Mooncake room's quarantine — its sender's last Done or Abort — must get through a link
that went down and came back: the receiver takes it from a sender that reconnected with the same
identity (ROUTER handover), and the sender keeps a failed out-of-band room's report queued long past
the outage (real sockets on loopback; the outage is a port nobody listens on yet)."""

from __future__ import annotations

import time
from types import SimpleNamespace

import zmq

from tests.transfer.conftest import free_port, wait_until
from tests.transfer.test_malformed import answer
from transfer import messages as m
from transfer.sender import ABORT_LINGER_MS, REPORT_LINGER_MS, TransferSender, _Conn


def dealer_as(endpoint: str, identity: bytes) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, identity)
    s.connect(endpoint)
    return s


def test_a_sender_that_reconnected_still_ends_its_quarantine(make_receiver):
    rx = make_receiver("mooncake", room_ttl_s=60, stale_write_guard_s=120)
    d = rx.open_room(16)
    old = dealer_as(rx.control, b"sender-1")
    old.send(m.encode(m.Begin(room=d.room, receiver_id=rx.id, total_rows=16)))
    assert isinstance(answer(old), m.Ready)
    rx.abort(d.room)  # the claimant may be writing: its blocks wait for it to report back
    assert rx.stats()["blocks_quarantined"] == len(d.block_ids)
    # its link went down and came back: a new connection, same identity, while the old one lingers
    new = dealer_as(rx.control, b"sender-1")
    try:
        time.sleep(0.2)  # connected
        new.send(m.encode(m.Abort(room=d.room, reason="write returned")))
        wait_until(lambda: rx.stats()["blocks_quarantined"] == 0, timeout=5, what="the quarantine to end")
        assert rx.allocator.num_used == 0
    finally:
        old.close()
        new.close()


def test_a_failed_out_of_band_room_keeps_its_report_queued_through_an_outage():
    assert REPORT_LINGER_MS >= 120_000 > ABORT_LINGER_MS  # TCP's longest retransmission backoff
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    conn = _Conn(zmq.Context.instance(), endpoint)  # nobody listens there yet: the outage
    oob = SimpleNamespace(writes_out_of_band=True)
    TransferSender._abort(None, conn, "r1", "deadline passed", TransferSender._linger(oob))
    time.sleep(2 * ABORT_LINGER_MS / 1000)  # longer than a ZMQ room's connection lingers
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)  # the link is back
    try:
        assert router.poll(10_000), "the Abort was dropped during the outage"
        _, raw = router.recv_multipart()
        msg = m.decode(raw)
        assert isinstance(msg, m.Abort) and msg.room == "r1"
    finally:
        router.close()
