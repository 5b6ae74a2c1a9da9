"""A language node cut off from its encoder (its link down: no reset ever comes, as from a dead host
or behind a partition) while a ZMQ room's rows are moving: the encoder's sender gives the room up
about `link_timeout_s` later (TCP_USER_TIMEOUT on its control connection ends the connection, the
link monitor sees it), not at the room's deadline, so a crashed host does not hold an encoder slot
per room for the whole transfer TTL. Bare transfer endpoints (tests/multihost/transfer_peers.py).
"""

from __future__ import annotations

import json
import time

import pytest

from tests.multihost.transfer_peers import Peer

pytestmark = pytest.mark.slow
LINK_TIMEOUT_S, DEADLINE_S = 2.0, 30.0


def test_a_language_node_cut_off_mid_room_fails_it_within_the_link_timeout(net, logs):
    lang, enc = net.nodes["lang"], net.nodes["enc1"]
    rx = Peer(lang, logs, "receiver", lang.ip, "60", "zmq")
    tx = None
    try:
        room = rx.ask("open cut")
        with net.throttled([enc], "1mbit"):  # the room's ~1 MB of rows take seconds
            tx0 = net.tx_bytes(enc)
            desc = json.dumps(room["descriptor"])
            tx = Peer(enc, logs, "sender", enc.ip, desc, str(DEADLINE_S), str(LINK_TIMEOUT_S))
            end = time.monotonic() + 30
            while net.tx_bytes(enc) - tx0 < 200_000:  # a fifth of the rows are out
                assert time.monotonic() < end and tx.proc.poll() is None, "the rows did not start"
                time.sleep(0.02)
            net.link(lang, up=False)
            cut = time.monotonic()
            try:
                out = tx.answer(DEADLINE_S + 30)
                after_cut = time.monotonic() - cut
            finally:
                net.link(lang, up=True)
        print(f"the sender gave up {after_cut:.1f}s after the cut: {out}")
        assert not out["ok"] and "receiver gone" in out["error"], out
        assert after_cut < LINK_TIMEOUT_S + 5 < DEADLINE_S / 3, f"gave up only {after_cut:.1f}s after the cut"
    finally:
        for p in (tx, rx):
            if p is not None:
                p.stop()
