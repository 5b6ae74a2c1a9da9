"""Encode-server test helpers: a vision tower that holds each forward until the test lets it go."""

from __future__ import annotations

import threading
import time


def gated_tower(vision):
    """(model, gate, seen): `model` runs `vision` but records each forward's grids in `seen` and
    holds the forward until `gate` is set, so the images submitted meanwhile wait in the queue."""
    gate, seen = threading.Event(), []

    class Gated:
        merge_unit = vision.merge_unit

        def __call__(self, pixels, grid):
            seen.append(grid.tolist())
            gate.wait(20)
            return vision(pixels, grid)

    return Gated(), gate, seen


def wait_started(seen: list, timeout_s: float = 10.0) -> None:
    """Until the gated tower's first forward has begun."""
    end = time.monotonic() + timeout_s
    while not seen:
        assert time.monotonic() < end, "the vision forward never started"
        time.sleep(0.01)


def room_request(rx, messages: list[dict], deadline_s: float = 20.0):
    """(descriptor, EncodeRequest) for a fresh 64-row room of receiver `rx`."""
    from encode_server.protocol import EncodeRequest
    from transfer import descriptor_to_builtins

    desc = rx.open_room(64)
    req = EncodeRequest(
        room=desc.room, messages=messages, descriptor=descriptor_to_builtins(desc), deadline_s=deadline_s
    )
    return desc, req
