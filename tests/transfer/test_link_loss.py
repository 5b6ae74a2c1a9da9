"""The sender's control connections when their receiver goes away (a sender in another process, both
backends): a room whose receiver is gone fails as soon as the connection says so, not at its
deadline, and a receiver restarted at the same address is served at once, the pooled connection to
its predecessor notwithstanding. (A receiver killed mid-transfer: test_receiver_killed.py.)"""

from __future__ import annotations

import socket
import time

import pytest

from tests.transfer.conftest import BACKENDS
from transfer import descriptor_to_builtins

pytestmark = [pytest.mark.slow, pytest.mark.parametrize("backend", BACKENDS)]
DEADLINE_S = 20.0
SHAPE = (40, 20, 64, 3, "float32")  # rows, vision rows, hidden, deepstack layers, dtype


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_a_receiver_restarted_at_the_same_address_is_served(backend, make_receiver, sender):
    port = free_port()
    for seed in range(4):  # each time the sender holds a pooled connection to the one before
        rx = make_receiver(backend, control_port=port)
        d = descriptor_to_builtins(rx.open_room(40))
        status, info = sender.send(d, seed, SHAPE, deadline_s=DEADLINE_S)
        assert status == "ok", f"incarnation {seed}: {info}"
        got = rx.wait_room(d["room"], 10)
        assert got.fill_ids.numel() == SHAPE[0]
        got.release()
        rx.close()
