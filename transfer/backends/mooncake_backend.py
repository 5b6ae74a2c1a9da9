"""Mooncake Transfer Engine backend: the sender writes rows straight into the receiver's pool.

The receiver registers its five regions once and advertises `host:rpc_port` (P2PHANDSHAKE metadata,
no metadata server); the sender issues one batched write per chunk (asynchronous when the caller has
work to do meanwhile, then waited for), its large ranges cut into about `mooncake_write_pieces`
pieces: Mooncake's TCP transport moves one transfer as 64 KiB chunks one after another, so pieces on
separate connections keep several chunks in flight. Protocol `tcp` here, `rdma` where NICs exist
(then sources are registered too, ref-counted, for the write's duration).
"""

from __future__ import annotations

import logging
import os
import threading

os.environ.setdefault("GLOG_minloglevel", "1")  # Mooncake's per-connection INFO lines; warnings stay
from mooncake.engine import TransferEngine  # noqa: E402

from transfer.backends.base import ReceiverBackend, SenderBackend, TransferError, Write

log = logging.getLogger(__name__)


def _engine(host: str, protocol: str, device: str) -> TransferEngine:
    eng = TransferEngine()
    rc = eng.initialize(host, "P2PHANDSHAKE", protocol, device)
    if rc != 0:
        raise TransferError(
            f"Mooncake engine failed to initialise on {host} ({protocol} {device!r}): rc={rc}"
        )
    return eng


class MooncakeSender(SenderBackend):
    name = "mooncake"
    writes_out_of_band = True

    def __init__(self, settings) -> None:
        self.engine = _engine(settings.host, settings.mooncake_protocol, settings.mooncake_device)
        self.register_sources = settings.mooncake_protocol != "tcp"
        self.pieces, self.min_piece = settings.mooncake_write_pieces, settings.mooncake_min_piece_bytes
        self._regs: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def write(
        self, conn, desc, room: str, writes: list[Write], claim: int = 0, done=None, while_writing=None
    ) -> None:
        if claim or done is not None:
            raise TransferError("Mooncake writes bypass the control link: claim and seal there")
        if not writes:
            if while_writing is not None:
                while_writing()
            return
        regs = [(w.src.ctypes.data, w.src.nbytes) for w in writes] if self.register_sources else []
        srcs, dsts, lens = split(
            [(w.src.ctypes.data, desc.buffers[w.buffer].addr + w.offset, w.src.nbytes) for w in writes],
            self.pieces,
            self.min_piece,
        )
        for r in regs:
            self._ref(r, +1)
        try:
            if while_writing is None:
                rc = self.engine.batch_transfer_sync_write(desc.session, srcs, dsts, lens)
            else:  # submit, do the caller's work while the engine moves the bytes, then wait
                batch = self.engine.batch_transfer_async_write(desc.session, srcs, dsts, lens)
                if not batch:
                    raise TransferError(f"Mooncake could not start a write to {desc.session}")
                try:
                    while_writing()
                finally:
                    rc = self.engine.get_batch_transfer_status([batch])
        finally:
            for r in regs:
                self._ref(r, -1)
        if rc != 0:
            raise TransferError(f"Mooncake write to {desc.session} failed (rc={rc}, {sum(lens)} bytes)")

    def _ref(self, region: tuple[int, int], d: int) -> None:
        with self._lock:
            n = self._regs.get(region, 0) + d
            if d > 0 and n == 1 and self.engine.register_memory(*region) != 0:
                raise TransferError(f"Mooncake could not register {region[1]} bytes at {region[0]:#x}")
            if n == 0:
                self._regs.pop(region, None)
                if d < 0:
                    self.engine.unregister_memory(region[0])
            else:
                self._regs[region] = n


def split(writes: list[tuple[int, int, int]], pieces: int, min_piece: int) -> tuple[list, list, list]:
    """(src, dst, nbytes) ranges -> src, dst and length lists in which no range is longer than about
    1/`pieces` of the total (never below `min_piece`), so a batch has at least `pieces` similar parts."""
    total = sum(n for _, _, n in writes)
    piece = max(min_piece, -(-total // max(1, pieces)))
    srcs, dsts, lens = [], [], []
    for s, d, n in writes:
        k = max(1, round(n / piece))
        step = -(-n // k)
        for a in range(0, n, step):
            srcs.append(s + a)
            dsts.append(d + a)
            lens.append(min(step, n - a))
    return srcs, dsts, lens


class MooncakeReceiver(ReceiverBackend):
    name = "mooncake"
    data_on_control = False

    def __init__(self, settings) -> None:
        self.host = settings.host
        self.engine = _engine(settings.host, settings.mooncake_protocol, settings.mooncake_device)
        self._registered: list[int] = []

    def register(self, regions: dict[str, tuple[int, int]]) -> tuple[str, dict[str, int]]:
        for name, (addr, nbytes) in regions.items():
            if nbytes == 0:
                continue
            if self.engine.register_memory(addr, nbytes) != 0:
                raise TransferError(f"Mooncake could not register buffer {name} ({nbytes} bytes)")
            self._registered.append(addr)
        return f"{self.host}:{self.engine.get_rpc_port()}", {n: a for n, (a, _) in regions.items()}

    def close(self) -> None:
        for addr in self._registered:
            self.engine.unregister_memory(addr)
        self._registered.clear()
