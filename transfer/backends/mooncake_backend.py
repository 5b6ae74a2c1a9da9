"""Mooncake Transfer Engine backend: the sender writes rows straight into the receiver's pool.

The receiver registers its five regions once and advertises `host:rpc_port` (P2PHANDSHAKE metadata,
no metadata server); the sender issues one batched synchronous write per chunk. Protocol `tcp` here,
`rdma` where NICs exist (then sources are registered too, ref-counted, for the write's duration).
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
        self._regs: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def write(self, conn, desc, room: str, writes: list[Write], claim: int = 0, done=None) -> None:
        if claim or done is not None:
            raise TransferError("Mooncake writes bypass the control link: claim and seal there")
        if not writes:
            return
        srcs = [w.src.__array_interface__["data"][0] for w in writes]
        dsts = [desc.buffers[w.buffer].addr + w.offset for w in writes]
        lens = [w.src.nbytes for w in writes]
        regs = [(s, n) for s, n in zip(srcs, lens, strict=True)] if self.register_sources else []
        for r in regs:
            self._ref(r, +1)
        try:
            rc = self.engine.batch_transfer_sync_write(desc.session, srcs, dsts, lens)
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
