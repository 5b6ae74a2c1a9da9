"""A Mooncake write cut off by a network partition must never land in receive blocks that have been
handed to another room. Bare transfer endpoints (tests/multihost/transfer_peers.py) in two
namespaces: a 1 Mbit/s link, cut mid-write; the receiver aborts the room; a new room must get other
blocks while the old sender may still write; when the link comes back and the old write finishes,
the sender reports back and only then do the aborted room's blocks return to the pool.
"""

from __future__ import annotations

import json
import time

import pytest

from tests.multihost.transfer_peers import Peer

pytest.importorskip("mooncake.engine")
pytestmark = pytest.mark.slow
GUARD_S = 120.0  # far longer than the test: blocks must come back because the sender reported


def test_partitioned_mooncake_write_never_lands_in_reused_blocks(net, logs):
    lang, enc = net.nodes["lang"], net.nodes["enc1"]
    rx = Peer(lang, logs, "receiver", lang.ip, str(GUARD_S))
    tx = None
    try:
        old = rx.ask("open old")
        with net.throttled([enc], "1mbit"):
            tx0 = net.tx_bytes(enc)
            tx = Peer(enc, logs, "sender", enc.ip, json.dumps(old["descriptor"]))
            end = time.monotonic() + 30
            while net.tx_bytes(enc) - tx0 < 200_000:  # a fifth of the rows are out
                assert time.monotonic() < end and tx.proc.poll() is None, "the write did not start"
                time.sleep(0.02)
            net.link(enc, up=False)
            try:
                rx.ask("abort old")
                time.sleep(2.5)
                new = rx.ask("open new")
                assert not set(new["blocks"]) & set(old["blocks"]), "blocks of a live writer were reused"
                assert rx.ask("inspect new")["blocks_quarantined"] == len(old["blocks"])
            finally:
                net.link(enc, up=True)
            end = time.monotonic() + 60
            while tx.proc.poll() is None and time.monotonic() < end:  # the old write returns, the
                time.sleep(0.2)  # sender reports back
            assert tx.proc.poll() is not None, "the sender's write did not return within 60s of the link"
        end = time.monotonic() + 10
        while (seen := rx.ask("inspect new"))["blocks_quarantined"] and time.monotonic() < end:
            time.sleep(0.2)
        assert seen["blocks_quarantined"] == 0, seen  # freed because the sender spoke, not by time
        assert seen["nonzero_rows"] == 0, "rows of the aborted room landed in the new room"
        assert seen.get("quarantine_timeouts", 0) == 0
    finally:
        for p in (tx, rx):
            if p is not None:
                p.stop()
