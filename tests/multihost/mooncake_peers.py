"""Bare Mooncake transfer endpoints for test_stale_write.py, each run in its own namespace:

    python -m tests.multihost.mooncake_peers receiver IP QUARANTINE_S   (commands on stdin, JSON lines out)
    python -m tests.multihost.mooncake_peers sender IP DESCRIPTOR_JSON  (one send of all-ones rows)

The receiver is a real `TransferReceiver`; its commands open, abort and inspect rooms.
"""

from __future__ import annotations

import json
import sys
import time

ROWS = 1000  # ~1 MB of rows: seconds on a 1 Mbit/s link
SPEC = dict(hidden=64, num_deepstack=3, dtype="float32", block_size=256, num_blocks=16)


def receiver(ip: str, quarantine_s: float) -> None:
    from transfer import BufferSpec, ReceiverSettings, TransferReceiver, descriptor_to_builtins

    spec = BufferSpec(**SPEC)
    settings = ReceiverSettings(
        backend="mooncake", host=ip, control_port=31010, room_ttl_s=60.0, stale_write_guard_s=quarantine_s
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


def sender(ip: str, descriptor: str) -> None:
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
    t = time.monotonic()
    try:
        TransferSender(SenderSettings(host=ip)).send(json.loads(descriptor), payload, deadline_s=3.0)
        out = {"ok": True}
    except Exception as e:  # noqa: BLE001 - reported to the test
        out = {"ok": False, "error": str(e)}
    print(json.dumps({"seconds": time.monotonic() - t, **out}), flush=True)


if __name__ == "__main__":
    role, ip, arg = sys.argv[1:4]
    receiver(ip, float(arg)) if role == "receiver" else sender(ip, arg)
