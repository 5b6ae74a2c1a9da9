"""Fixtures for transfer tests: a receiver per backend in this process, a sender in another."""

from __future__ import annotations

import time

import pytest

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
