"""Bare transfer endpoints for test_stale_write.py, each run in its own namespace:

    python -m tests.multihost.transfer_peers receiver IP QUARANTINE_S [BACKEND]
        (commands on stdin, JSON lines out; BACKEND mooncake (default) or zmq)
    python -m tests.multihost.transfer_peers sender IP DESCRIPTOR_JSON [DEADLINE_S LINK_TIMEOUT_S]
        (one send of all-ones rows; defaults 3 s and the sender's own link timeout)

The receiver is a real `TransferReceiver`; its commands open, abort and inspect rooms. `Peer` runs
one of them in a node's namespace for a test.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

ROWS = 1000  # ~1 MB of rows: seconds on a 1 Mbit/s link
SPEC = dict(hidden=64, num_deepstack=3, dtype="float32", block_size=256, num_blocks=16)


class Peer:
    """One endpoint of this module in `node`'s namespace, driven over its stdin/stdout."""

    def __init__(self, node, logs: Path, *args: str) -> None:
        cmd = ["ip", "netns", "exec", node.ns, sys.executable, "-m", "tests.multihost.transfer_peers", *args]
        self.log = open(logs / f"peer-{args[0]}.log", "ab")  # noqa: SIM115 - closed in stop()
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

    def answer(self, timeout_s: float = 120.0) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        assert ready, f"no answer within {timeout_s:.0f}s; see {self.log.name}"
        out = self.proc.stdout.readline()
        assert out, f"peer exited ({self.proc.poll()}); see {self.log.name}"
        return json.loads(out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self.log.close()


def receiver(ip: str, quarantine_s: float, backend: str = "mooncake") -> None:
    from transfer import BufferSpec, ReceiverSettings, TransferReceiver, descriptor_to_builtins

    spec = BufferSpec(**SPEC)
    settings = ReceiverSettings(
        backend=backend, host=ip, control_port=31010, room_ttl_s=60.0, stale_write_guard_s=quarantine_s
    )
    rx = TransferReceiver(spec, settings)
    blocks: dict[str, list[int]] = {}

    def rows(room: str):
        return [rx.buffers.embeddings[b * spec.block_size : (b + 1) * spec.block_size] for b in blocks[room]]

    for line in sys.stdin:
        cmd, room = line.split()
        if cmd == "open":  # a room with zeroed rows
            desc = rx.open_room(ROWS, room)
            blocks[room] = desc.block_ids
            for r in rows(room):
                r.zero_()
            out = {"descriptor": descriptor_to_builtins(desc), "blocks": desc.block_ids}
        elif cmd == "abort":
            rx.abort(room, "test")
            out = {}
        else:  # "inspect"
            live = rx.rooms.get(room)
            nonzero = sum(int((r != 0).any(1).sum()) for r in rows(room))
            out = {"nonzero_rows": nonzero, "open": live is not None, **rx.stats()}
        print(json.dumps({"t": time.monotonic(), **out}), flush=True)


def sender(ip: str, descriptor: str, deadline_s: float = 3.0, link_timeout_s: float | None = None) -> None:
    import torch

    from transfer import MultimodalPayload, SenderSettings, TransferSender

    payload = MultimodalPayload(
        fill_ids=torch.arange(ROWS),
        mrope=torch.zeros(3, ROWS, dtype=torch.long),
        embeddings=torch.ones(ROWS, SPEC["hidden"]),
        deepstack=torch.ones(ROWS, SPEC["hidden"] * SPEC["num_deepstack"]),
        mrope_delta=0,
        num_images=1,
    )
    settings = SenderSettings(
        host=ip, **({} if link_timeout_s is None else {"link_timeout_s": link_timeout_s})
    )
    t = time.monotonic()
    try:
        TransferSender(settings).send(json.loads(descriptor), payload, deadline_s=deadline_s)
        out = {"ok": True}
    except Exception as e:  # noqa: BLE001 - reported to the test
        out = {"ok": False, "error": str(e)}
    print(json.dumps({"seconds": time.monotonic() - t, **out}), flush=True)


if __name__ == "__main__":
    role, ip, arg, *more = sys.argv[1:]
    if role == "receiver":
        receiver(ip, float(arg), *more)
    else:
        sender(ip, arg, *map(float, more))
