"""A Mooncake write cut off by a network partition must never land in receive blocks that have been
handed to another room. Bare transfer endpoints (tests/multihost/mooncake_peers.py) in two
namespaces: a 1 Mbit/s link, cut mid-write; the receiver aborts the room, its blocks leave
quarantine and go to a new room; the link comes back and TCP delivers the rest of the old write.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.multihost.netns import Topology

pytest.importorskip("mooncake.engine")
pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
QUARANTINE_S = 2.0
KNOWN_BUG = (
    "MooncakeSender.write (transfer/backends/mooncake_backend.py, batch_transfer_sync_write) has no "
    "deadline and cannot be cancelled, while the receiver frees a failed room's blocks after a fixed "
    "quarantine (transfer/rooms.py RoomTable.fail/expired): a write held up by a partition lands in "
    "whatever room owns those blocks when the link returns"
)


class Peer:
    def __init__(self, net: Topology, node, logs: Path, *args: str) -> None:
        cmd = ["ip", "netns", "exec", node.ns, sys.executable, "-m", "tests.multihost.mooncake_peers", *args]
        self.log = open(logs / f"peer-{args[0]}.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,
        )

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def answer(self) -> dict:
        out = self.proc.stdout.readline()
        assert out, f"peer exited ({self.proc.poll()}); see {self.log.name}"
        return json.loads(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


def test_partitioned_mooncake_write_never_lands_in_reused_blocks(net, logs):
    lang, enc = net.nodes["lang"], net.nodes["enc1"]
    rx = Peer(net, lang, logs, "receiver", lang.ip, str(QUARANTINE_S))
    tx = None
    try:
        old = rx.ask("open old")
        with net.throttled([enc], "1mbit"):
            tx0 = net.tx_bytes(enc)
            tx = Peer(net, enc, logs, "sender", enc.ip, json.dumps(old["descriptor"]))
            end = time.monotonic() + 30
            while net.tx_bytes(enc) - tx0 < 200_000:  # a fifth of the rows are out
                assert time.monotonic() < end and tx.proc.poll() is None, "the write did not start"
                time.sleep(0.02)
            net.link(enc, up=False)
            try:
                rx.ask("abort old")
                time.sleep(QUARANTINE_S + 0.5)
                new = rx.ask("open new")
                assert new["blocks"] == old["blocks"], "precondition: the freed blocks are reused"
            finally:
                net.link(enc, up=True)
            end = time.monotonic() + 40
            while True:  # until the sender's write returned (then whatever it wrote has landed)
                done = tx.proc.poll() is not None
                seen = rx.ask("inspect new")
                if seen["nonzero_rows"] or done or time.monotonic() > end:
                    break
                time.sleep(0.2)
        if seen["nonzero_rows"]:  # expected while the bug stands; the test passes once it is fixed
            pytest.xfail(
                f"{seen['nonzero_rows']} rows of aborted room 'old' landed in room 'new' (open: {seen['open']}) "
                f"{seen['t'] - new['t']:.1f}s after it got the blocks. Known bug: {KNOWN_BUG}"
            )
        assert done, "the sender's write neither returned nor landed within 40s of the link coming back"
    finally:
        for p in (tx, rx):
            if p is not None:
                p.stop()
