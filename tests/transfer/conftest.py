"""Fixtures for transfer tests: a receiver per backend in this process, a sender in another."""

from __future__ import annotations

import socket
import time

import pytest
import zmq

from tests.transfer.peer import SenderProcess
from transfer import BufferSpec, ReceiverSettings, TransferReceiver

BACKENDS = ["zmq", "mooncake"]


@pytest.fixture(scope="module")
def sender():
    p = SenderProcess()
    yield p
    p.close()


@pytest.fixture
def make_receiver():
    made = []

    def make(backend: str, **kw) -> TransferReceiver:
        spec_kw = {k: kw.pop(k) for k in list(kw) if k in BufferSpec.model_fields}
        kw.setdefault("stale_write_guard_s", 0.5)
        spec = BufferSpec(**{"hidden": 64, "num_deepstack": 3, "block_size": 16, "num_blocks": 64, **spec_kw})
        rx = TransferReceiver(spec, ReceiverSettings(backend=backend, **kw))
        made.append(rx)
        return rx

    yield make
    for rx in made:
        rx.close()


def wait_until(pred, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A loopback TCP port nobody listens on (yet)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def once_port_free(bind, what: str):
    """`bind()` retried until it succeeds: a closed ZMQ socket's port is released asynchronously."""
    for _ in range(100):
        try:
            return bind()
        except zmq.ZMQError:
            time.sleep(0.05)
    raise AssertionError(f"{what} never came free")
