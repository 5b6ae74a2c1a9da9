"""Receive-side bookkeeping of rooms: who owns which blocks, in what state, until when.

A room is opened with its first blocks (OPEN), claimed by one sender connection (RECEIVING), may
wait for more blocks (resume), and ends DONE (handed out, blocks held until released) or failed
(blocks freed at once, or after a quarantine when a sender may still be writing out of band).
Thread-safe; no sockets, no tensors.
"""

from __future__ import annotations

import collections
import enum
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
        self._quarantine: list[tuple[float, list[int]]] = []
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
                self._quarantine.append((time.monotonic() + self.quarantine_s, room.blocks))
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

    def expired(self, now: float) -> list[Room]:
        with self.lock:
            due = [q for q in self._quarantine if q[0] <= now]
            if due:
                self._quarantine = [q for q in self._quarantine if q[0] > now]
                for _, blocks in due:
                    self.alloc.free(blocks)
            return [r for r in self.rooms.values() if r.state is not State.DONE and r.deadline <= now]

    def waiting_resume(self) -> list[Room]:
        with self.lock:
            return [r for r in self.rooms.values() if r.want is not None]

    @property
    def quarantined_blocks(self) -> int:
        with self.lock:
            return sum(len(b) for _, b in self._quarantine)

    def _finish(self, room_id: str, outcome: str) -> None:
        self.finished[room_id] = outcome
        while len(self.finished) > self._recent:
            self.finished.popitem(last=False)
