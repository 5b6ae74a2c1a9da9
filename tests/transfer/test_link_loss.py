"""The sender's control connections when their receiver goes away (a sender in another process, both
backends): a room whose receiver is gone fails once the connection has stayed down a moment, not at
its deadline, and a receiver restarted at the same address is served at once, the pooled connection
to its predecessor notwithstanding. (A receiver killed mid-transfer: test_receiver_killed.py.)"""

from __future__ import annotations

import time

import pytest
import zmq

from tests.transfer.conftest import BACKENDS, free_port, once_port_free
from transfer import TransferSender, descriptor_to_builtins
from transfer.sender import LOSS_GRACE_S, _Conn

pytestmark = pytest.mark.slow
each_backend = pytest.mark.parametrize("backend", BACKENDS)
DEADLINE_S = 20.0
SHAPE = (40, 20, 64, 3, "float32")  # rows, vision rows, hidden, deepstack layers, dtype


@each_backend
def test_a_room_of_a_closed_receiver_fails_long_before_its_deadline(backend, make_receiver, sender):
    rx = make_receiver(backend)
    status, _ = sender.send(descriptor_to_builtins(rx.open_room(40)), 1, SHAPE)
    assert status == "ok"  # the sender now pools a connection to rx
    d = descriptor_to_builtins(rx.open_room(40))
    rx.close()
    t = time.monotonic()
    status, info = sender.send(d, 2, SHAPE, deadline_s=DEADLINE_S)
    took = time.monotonic() - t
    assert status == "failed" and "receiver gone" in info, info
    assert took < DEADLINE_S / 4, f"the sender took {took:.1f}s to see its receiver gone: {info}"


@each_backend
def test_a_receiver_restarted_at_the_same_address_is_served(backend, make_receiver, sender):
    port = free_port()
    for seed in range(3):  # each time the sender holds a pooled connection to the one before
        rx = once_port_free(lambda: make_receiver(backend, control_port=port), f"port {port}")
        d = descriptor_to_builtins(rx.open_room(40))
        status, info = sender.send(d, seed, SHAPE, deadline_s=DEADLINE_S)
        assert status == "ok", f"incarnation {seed}: {info}"
        got = rx.wait_room(d["room"], 10)
        assert got.fill_ids.numel() == SHAPE[0]
        got.release()
        rx.close()
        time.sleep(2 * LOSS_GRACE_S)  # a restart takes longer than the sender's grace for a lost link


def test_an_idle_connection_whose_receiver_went_away_is_replaced():
    """The pool hands a room a connection that is up, never one whose receiver has gone (the room's
    first messages would wait for a reconnect that may never come, or be lost with the old link)."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    endpoint = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
    sender = TransferSender()
    try:
        conn = sender._get(endpoint)
        time.sleep(0.3)  # connected
        sender._put(conn)
        assert sender._get(endpoint) is conn, "a connection that is up was not reused"
        sender._put(conn)
        router.close(0)
        time.sleep(0.3)  # the monitor has seen it close
        fresh = sender._get(endpoint)
        assert fresh is not conn, "a connection whose receiver went away was handed out again"
        fresh.close()
    finally:
        router.close(0)
        sender.close()


def router_at(ctx: zmq.Context, port: int) -> zmq.Socket:
    s = ctx.socket(zmq.ROUTER)
    try:
        s.bind(f"tcp://127.0.0.1:{port}")
    except zmq.ZMQError:
        s.close(0)
        raise
    return s


def test_a_link_is_lost_only_once_down_for_the_grace():
    """A connection that drops and comes back within `LOSS_GRACE_S` (a receiver restarted at the same
    address) does not fail its room; one that stays down does."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    conn = _Conn(ctx, f"tcp://127.0.0.1:{port}")
    try:
        time.sleep(0.3)
        assert conn.link_down() is None, "not connected"
        router.close(0)
        time.sleep(0.1)
        assert conn.link_down() is not None, "the monitor did not see the receiver go"
        assert conn.link_down(LOSS_GRACE_S) is None, "down for less than the grace, and already lost"
        router = once_port_free(lambda: router_at(ctx, port), f"port {port}")
        time.sleep(0.5)  # libzmq reconnects every 100 ms
        assert conn.link_down() is None, "the connection did not come back"
        router.close(0)
        time.sleep(0.1)
        assert conn.link_down() is not None  # a waiting room looks every LOSS_CHECK_MS
        time.sleep(LOSS_GRACE_S + 0.1)
        assert "receiver gone" in (conn.link_down(LOSS_GRACE_S) or ""), "a link down past the grace"
    finally:
        router.close(0)
        conn.close()
