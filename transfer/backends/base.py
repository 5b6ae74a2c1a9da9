"""The backend interface: how a sender's row ranges reach the receiver's registered blocks.

A sender backend gets a list of `Write`s (buffer, byte offset in that buffer, source bytes) plus the
room's control connection, and returns once the bytes are in place or raises `TransferError`.
A receiver backend registers the pool and says how senders reach it (`session`, addresses) and
whether data arrives as frames on the control socket (zmq) or out of band (Mooncake).
"""

from __future__ import annotations

import abc
from typing import NamedTuple

import numpy as np


class TransferError(RuntimeError):
    """Bytes could not be moved (peer gone, engine error, deadline)."""


class WriteInFlight(TransferError):
    """Gave up waiting for an out-of-band write whose bytes may still land (`pending`: the backend's
    handles of what is still moving): the room's blocks must stay quarantined, so the sender must not
    tell the receiver it is done."""

    def __init__(self, message: str, pending: list) -> None:
        super().__init__(message)
        self.pending = pending


class Write(NamedTuple):
    buffer: str  # embeddings | fill_ids | mrope | deepstack | aux
    offset: int  # byte offset in the receiver's buffer region
    src: np.ndarray  # contiguous 1-D uint8 source bytes (kept alive by the caller until written)


class SenderBackend(abc.ABC):
    name: str
    writes_out_of_band: bool  # True: bytes bypass the control link (handshake or verified link first)

    @abc.abstractmethod
    def write(
        self, conn, desc, room: str, writes: list[Write], claim: int = 0, done=None, while_writing=None
    ) -> None:
        """Put every write's bytes into the receiver's region; `conn` is the room's control link.

        Fast path (backends whose bytes travel on the control link only): `claim` > 0 claims the
        room for that many rows with the first bytes, and `done` (a `Done`) seals it with the last.
        `while_writing` (no arguments) is called once the bytes are on their way, before returning;
        even if it raises, an out-of-band backend returns only once every byte landed or failed."""

    def close(self) -> None:  # noqa: B027 - optional
        pass


class ReceiverBackend(abc.ABC):
    name: str
    data_on_control: bool  # True: Data frames arrive on the control socket

    @abc.abstractmethod
    def register(self, regions: dict[str, tuple[int, int]]) -> tuple[str, dict[str, int]]:
        """Register the pool once; returns (session for senders, name -> address to write at)."""

    def close(self) -> None:  # noqa: B027 - optional
        pass
