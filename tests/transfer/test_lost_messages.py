"""Messages lost when a control connection drops and comes back (a sender in another process, a
real TCP relay between it and the receiver that can lose what one direction carries and then reset
the flow, as a middlebox or a flapping link does): libzmq loses the message it was writing and a
ROUTER what it queued for the peer that was away, and the sender reconnects within its grace.
Its Status makes the receiver answer again (a lost Ready or Ack) or fail the room at once (a lost
room), instead of both waiting for the deadline."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import torch

from tests.transfer.conftest import wait_until
from tests.transfer.peer import make_payload
from transfer import descriptor_to_builtins

pytestmark = pytest.mark.slow
DEADLINE_S = 20.0
SHAPE = (40, 20, 64, 3, "float32")  # rows, vision rows, hidden, deepstack layers, dtype


class CutRelay:
    """Relays TCP between clients and `target`; `swallow[d]` drops what direction d ('up': client
    to target, 'down': back) carries, counting it; `cut()` resets every relayed connection."""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.swallow = {"up": False, "down": False}
        self.swallowed = {"up": 0, "down": 0}
        self.conns: list[socket.socket] = []
        self.accepted = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target)
            except OSError:  # the receiver is gone (teardown): refuse this client too
                client.close()
                continue
            self.conns += [client, upstream]
            self.accepted += 1
            threading.Thread(target=self._pump, args=(client, upstream, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        while True:
            try:
                data = src.recv(1 << 16)
            except OSError:
                return
            if not data:
                return
            if self.swallow[direction]:
                self.swallowed[direction] += len(data)
                continue
            try:
                dst.sendall(data)
            except OSError:
                return

    def cut(self) -> None:
        conns, self.conns = self.conns, []
        for s in conns:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST at close
            try:
                s.shutdown(socket.SHUT_RDWR)  # wakes its pump (a close alone would not end its recv)
            except OSError:
                pass
            s.close()

    def close(self) -> None:
        self.listener.close()
        self.cut()


@pytest.fixture
def relayed(make_receiver):
    made = []

    def make(backend: str):
        rx = make_receiver(backend, room_ttl_s=60)
        relay = CutRelay(rx.control)
        made.append(relay)
        return rx, relay

    yield make
    for r in made:
        r.close()


def room_via(rx, relay) -> dict:
    d = descriptor_to_builtins(rx.open_room(SHAPE[0]))
    d["control"] = relay.endpoint
    return d


def assert_rows(got, seed: int) -> None:
    want = make_payload(seed, *SHAPE)
    assert torch.equal(got.embeddings, want.embeddings) and torch.equal(got.deepstack, want.deepstack)
    assert got.fill_ids.tolist() == want.fill_ids.tolist()


def warm(sender, rx, relay) -> None:
    """One room through the relay, so the sender pools a connection that is up."""
    d = room_via(rx, relay)
    assert sender.send(d, 0, SHAPE)[0] == "ok"
    rx.wait_room(d["room"], 10).release()


def send_losing(sender, rx, relay, direction: str, seed: int, lost, meanwhile=None):
    """A room through the relay while it swallows `direction` until `lost()`, then resets the flow
    (after `meanwhile(room)`, if given) -> (room, status, info, seconds until the sender answered)."""
    warm(sender, rx, relay)
    d = room_via(rx, relay)
    relay.swallow[direction] = True
    t = time.monotonic()
    tag = sender.submit(d, seed, SHAPE, deadline_s=DEADLINE_S)
    if meanwhile is not None:
        meanwhile(d)
    wait_until(lost, what=f"what goes {direction} to be lost")
    relay.swallow[direction] = False
    relay.cut()
    status, info = sender.result(tag, timeout=DEADLINE_S + 10)
    return d, status, info, time.monotonic() - t


def test_a_room_lost_with_its_connection_fails_at_once(relayed, sender):
    """ZMQ: the room's one message (claim, rows, seal) is lost: the receiver never heard of it and
    would hold its blocks, the sender its payload, until the deadline."""
    rx, relay = relayed("zmq")
    _, status, info, took = send_losing(sender, rx, relay, "up", 1, lambda: relay.swallowed["up"] > 15_000)
    assert status == "failed" and "never arrived" in info, info
    assert took < DEADLINE_S / 4, f"{took:.1f}s: the room waited for its deadline"
    wait_until(lambda: rx.allocator.num_used == 0, timeout=5, what="the room's blocks to come back")
    assert relay.accepted == 2  # the sender reconnected through the relay
    d = room_via(rx, relay)  # and the link serves the next room
    assert sender.send(d, 2, SHAPE)[0] == "ok"
    got = rx.wait_room(d["room"], 10)
    assert_rows(got, 2)
    got.release()


@pytest.mark.parametrize("consumed", [False, True], ids=["rows-held", "rows-consumed"])
def test_a_lost_ack_is_sent_again(relayed, sender, consumed):
    """ZMQ: the rows arrived and were sealed, the Ack was lost: the sender asks again and gets it,
    whether the room's rows are still held or were consumed meanwhile."""
    rx, relay = relayed("zmq")
    got = []

    def sealed(d):  # verified; its Ack goes into the void
        got.append(rx.wait_room(d["room"], 10))
        assert_rows(got[0], 3)
        if consumed:
            got[0].release()

    _, status, info, took = send_losing(
        sender, rx, relay, "down", 3, lambda: relay.swallowed["down"] > 0, sealed
    )
    assert status == "ok", info
    assert took < DEADLINE_S / 4
    assert rx.stats()["status_queries"] == 1
    got[0].release()
    assert rx.allocator.num_used == 0


def test_a_lost_ready_is_sent_again(relayed, sender):
    """Mooncake: the handshake's Ready was lost; the sender asks again, then writes: bit-exact."""
    rx, relay = relayed("mooncake")
    d, status, info, took = send_losing(sender, rx, relay, "down", 4, lambda: relay.swallowed["down"] > 0)
    assert status == "ok", info
    assert took < DEADLINE_S / 4
    got = rx.wait_room(d["room"], 10)
    assert_rows(got, 4)
    got.release()
    assert rx.stats()["status_queries"] >= 1
