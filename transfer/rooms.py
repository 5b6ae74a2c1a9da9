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
    answer: object = None  # the last Ready / Resume / Ack(ok) sent to its sender (a Status repeats it)
    future: Future = field(default_factory=Future)
    # per buffer, the request row whose bytes are due next on the control link: rows come in request
    # order, so a gap (a message lost when a connection dropped and came back, a sender's bug) is
    # seen at the next frame, and a seal over rows that never came at the Done
    next_row: dict[str, int] = field(default_factory=dict)
    _pos: dict[int, int] = field(default_factory=dict, repr=False)  # block -> index in `blocks`

    def take_rows(self, buffer: str, r0: int, r1: int, block_size: int) -> str | None:
        """Pool rows [r0, r1) of `buffer` (in this room's blocks) are arriving: None if they are the
        request rows due next (and then they are counted), else why not."""
        pos, bs = self.positions(), block_size
        b0, b1 = r0 // bs, (r1 - 1) // bs
        start, due = pos[b0] * bs + r0 - b0 * bs, self.next_row.get(buffer, 0)
        if start > due:
            return f"{buffer} rows {due}..{start} never arrived"
        if start < due:
            return f"{buffer} rows {start}..{min(due, start + r1 - r0)} arrived twice"
        if any(pos[b] != pos[b0] + b - b0 for b in range(b0 + 1, b1 + 1)):
            return f"{buffer} pool rows {r0}..{r1} span blocks out of the room's order"
        self.next_row[buffer] = start + r1 - r0
        return None

    def rows_missing(self, buffer: str, count: int) -> str | None:
        """None if exactly request rows 0..count of `buffer` arrived."""
        got = self.next_row.get(buffer, 0)
        if got < count:
            return f"{buffer} rows {got}..{count} never arrived"
        if got > count:
            return f"{buffer} rows {count}..{got} are beyond the sealed {count}"
        return None

    def positions(self) -> dict[int, int]:
        """block -> its index in `blocks` (request rows index*block_size onwards)."""
        if len(self._pos) != len(self.blocks):  # blocks are only ever appended (grow, resume)
            self._pos = {b: i for i, b in enumerate(self.blocks)}
        return self._pos


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
