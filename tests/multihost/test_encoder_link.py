"""An encoder whose host stops answering while it holds a request (its link cut: no reset ever
comes, as from a dead host or behind a partition): the language server's `EncoderPool` gives the
attempt up about `link_timeout_s` later (TCP keepalive / TCP_USER_TIMEOUT on its connections end
it), takes the encoder out of rotation and reports the room's writer as possibly alive, instead of
holding the request until the encode deadline (the servers' 120 s). The encoder is a bare TCP
server in its own namespace that takes the request and never answers (as one computing would);
the pool runs in the hub namespace."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from encode_server.protocol import EncodeRequest
from language_server.mm.base import EncoderUnavailable
from language_server.mm.encoder_pool import EncoderPool
from tests.multihost.netns import NetnsThreads

pytestmark = pytest.mark.slow
LINK_TIMEOUT_S, DEADLINE_S, PORT = 2.0, 40.0, 30190


def silent_encoder(listener: socket.socket, got_request: threading.Event, stop: threading.Event) -> None:
    conn, _ = listener.accept()
    with conn:
        conn.recv(65536)
        got_request.set()
        stop.wait(DEADLINE_S + 30)  # never answers


def test_an_encoder_cut_off_mid_request_is_given_up_within_the_link_timeout(net, hub):
    enc = net.nodes["enc1"]
    in_enc = NetnsThreads(enc.ns, workers=1)
    listener = in_enc.call(socket.create_server, (enc.ip, PORT))
    got_request, stop = threading.Event(), threading.Event()
    in_enc.submit(silent_encoder, listener, got_request, stop)
    failed_attempts: list[bool] = []

    async def run() -> float:
        pool = EncoderPool([f"http://{enc.ip}:{PORT}"], timeout_s=DEADLINE_S, link_timeout_s=LINK_TIMEOUT_S)

        async def make(attempt: int) -> EncodeRequest:
            return EncodeRequest(room=f"r{attempt}", messages=[], descriptor={}, deadline_s=DEADLINE_S)

        async def on_failed(req: EncodeRequest, writer_gone: bool) -> None:
            failed_attempts.append(writer_gone)

        call = asyncio.ensure_future(pool.encode(make, on_failed))
        while not got_request.is_set():
            await asyncio.sleep(0.02)
        await asyncio.to_thread(net.link, enc, False)
        cut = time.monotonic()
        try:
            with pytest.raises(EncoderUnavailable) as e:
                await asyncio.wait_for(call, DEADLINE_S + 10)
        finally:
            await asyncio.to_thread(net.link, enc, True)
        after_cut = time.monotonic() - cut
        print(f"the attempt was given up {after_cut:.1f}s after the cut: {e.value}")
        assert not pool.encoders[f"http://{enc.ip}:{PORT}"].healthy
        await pool.close()
        return after_cut

    try:
        after_cut = hub.call(asyncio.run, run())
    finally:
        stop.set()
        listener.close()
        in_enc.shutdown(wait=True)
    assert failed_attempts == [False], failed_attempts  # it may still write: Mooncake quarantines the room
    assert after_cut < LINK_TIMEOUT_S + 5 < DEADLINE_S / 3, f"given up only {after_cut:.1f}s after the cut"
