"""Receive-side bookkeeping of rooms: who owns which blocks, in what state, until when.

A room is opened with its first blocks (OPEN), claimed by one sender connection (RECEIVING), may
wait for more blocks (resume), and ends DONE (handed out, blocks held until released) or failed
(blocks freed at once; or, when its sender may still be writing out of band (Mooncake), held in
quarantine until that sender is heard from again — its write has returned — or the owner says no
write can come, or a long guard time).
Thread-safe; no sockets, no tensors.
"""

from __future__ import annotations

import collections
import enum
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from transfer.allocator import BlockAllocator


class RoomFailed(RuntimeError):
    """The room ended without a usable result; `reason` says why."""


class State(enum.Enum):
    OPEN = "open"
    RECEIVING = "receiving"
    DONE = "done"


@dataclass
class Room:
    id: str
    blocks: list[int]
    deadline: float  # monotonic
    tag: int = 0  # payload.room_tag(id), expected in the aux seal
    state: State = State.OPEN
    peer: bytes | None = None  # ZMQ identity of the sender connection that claimed it
    want: tuple[int, int] | None = None  # (blocks still needed, rows sent) while waiting to resume
    future: Future = field(default_factory=Future)
    bytes_in: int = 0


class RoomTable:
    def __init__(self, allocator: BlockAllocator, quarantine_s: float, recent: int = 4096) -> None:
        self.alloc = allocator
        self.quarantine_s = quarantine_s
        self.rooms: dict[str, Room] = {}
        self.finished: collections.OrderedDict[str, str] = collections.OrderedDict()  # id -> outcome
        self._recent = recent
        self._quarantine: dict[
            str, tuple[float, list[int], bytes | None]
        ] = {}  # room -> (until, blocks, peer)
        self.lock = threading.RLock()
        self.counters = collections.Counter()

    def add(self, room: Room) -> None:
        with self.lock:
            if room.id in self.rooms or room.id in self.finished:
                self.alloc.free(room.blocks)
                raise ValueError(f"room {room.id!r} already exists")
            self.rooms[room.id] = room

    def get(self, room_id: str) -> Room | None:
        with self.lock:
            return self.rooms.get(room_id)

    def fail(self, room_id: str, reason: str, out_of_band_writer: bool = False) -> Room | None:
        """End a room that is not DONE: free (or quarantine) its blocks, fail its future."""
        with self.lock:
            room = self.rooms.get(room_id)
            if room is None or room.state is State.DONE:
                return None
            del self.rooms[room_id]
            self._finish(room_id, "failed: " + reason)
            if out_of_band_writer and room.state is State.RECEIVING:
                self._quarantine[room_id] = (time.monotonic() + self.quarantine_s, room.blocks, room.peer)
            else:
                self.alloc.free(room.blocks)
            self.counters["failed"] += 1
        if not room.future.done():
            room.future.set_exception(RoomFailed(f"room {room_id}: {reason}"))
        return room

    def done(self, room: Room, result) -> None:
        with self.lock:
            room.state = State.DONE
            self.counters["done"] += 1
        room.future.set_result(result)

    def release(self, room_id: str) -> bool:
        """Free a DONE room's blocks (its rows were consumed). False if it was not DONE here."""
        with self.lock:
            room = self.rooms.get(room_id)
            if room is None or room.state is not State.DONE:
                return False
            del self.rooms[room_id]
            self._finish(room_id, "released")
            self.alloc.free(room.blocks)
            return True

    def outcome(self, room_id: str) -> str | None:
        with self.lock:
            return self.finished.get(room_id)

    def writer_done(self, room_id: str, peer: bytes | None) -> bool:
        """The sender of a quarantined room spoke again (its write returned), or the owner knows no
        write can come (peer None): free the blocks."""
        with self.lock:
            q = self._quarantine.get(room_id)
            if q is None or peer is not None and q[2] != peer:
                return False
            del self._quarantine[room_id]
            self.alloc.free(q[1])
            return True

    def expired(self, now: float) -> list[Room]:
        with self.lock:
            for room_id, (until, blocks, _) in list(self._quarantine.items()):
                if until <= now:  # the sender never came back (dead, or partitioned for very long)
                    del self._quarantine[room_id]
                    self.alloc.free(blocks)
                    self.counters["quarantine_timeouts"] += 1
            return [r for r in self.rooms.values() if r.state is not State.DONE and r.deadline <= now]

    def next_due(self, now: float, retry_s: float) -> float:
        """When `expired` next has work (a room's deadline, a quarantine's end), or `now + retry_s`
        while a room waits for blocks to resume; inf if never."""
        with self.lock:
            due = min((q[0] for q in self._quarantine.values()), default=math.inf)
            for r in self.rooms.values():
                if r.want is not None:
                    due = min(due, now + retry_s, r.deadline)
                elif r.state is not State.DONE:
                    due = min(due, r.deadline)
            return due

    def waiting_resume(self) -> list[Room]:
        with self.lock:
            return [r for r in self.rooms.values() if r.want is not None]

    @property
    def quarantined_blocks(self) -> int:
        with self.lock:
            return sum(len(q[1]) for q in self._quarantine.values())

    def _finish(self, room_id: str, outcome: str) -> None:
        self.finished[room_id] = outcome
        while len(self.finished) > self._recent:
            self.finished.popitem(last=False)
