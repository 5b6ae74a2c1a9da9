"""A sender in its own process for the transfer tests: payloads from seeds, commands over a pipe.

`SenderProcess` spawns `serve`, which runs a real `TransferSender`; `send(desc, seed, ...)` returns
the `SendResult` fields or the failure text; with `claim_s` the room is first claimed (as an encoder
does once it knows the row count) and the rows follow that much later, or never (`abandon=True`).
Each command runs in its own thread, so many rooms can be in flight at once. Mooncake writes are cut
into small pieces, so the tiny test payloads take the parallel-pieces path. `make_payload` builds
the same payload on both sides from a seed.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
import uuid

import torch

from transfer import MultimodalPayload, SenderSettings, TransferFailed, TransferSender


def make_payload(seed: int, n: int, v: int, hidden: int, nds: int, dtype: str) -> MultimodalPayload:
    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    return MultimodalPayload(
        fill_ids=torch.randint(0, 150_000, (n,), generator=g),
        mrope=torch.randint(0, 10_000, (3, n), generator=g),
        embeddings=torch.randn(v, hidden, generator=g).to(dt),
        deepstack=torch.randn(v, nds * hidden, generator=g).to(dt),
        mrope_delta=int(torch.randint(-500, 500, (1,), generator=g)),
        num_images=seed % 5,
    )


def serve(conn) -> None:
    sender = TransferSender(SenderSettings(mooncake_min_piece_bytes=4096))
    lock = threading.Lock()
    conn.send(("ready", None))

    def run(tag, desc, seed, shape, deadline_s, claim_s, abandon):
        try:
            if claim_s is not None:
                claimed = sender.claim(desc, shape[0], deadline_s)
                time.sleep(claim_s)
                if abandon:
                    sender.abandon(desc, "encoder: gave up")
                    out = ("abandoned", claimed)
                    with lock:
                        conn.send((tag, out))
                    return
            r = sender.send(desc, make_payload(seed, *shape), deadline_s=deadline_s)
            out = ("ok", {"rows": r.rows, "bytes": r.bytes, "resumes": r.resumes, "seconds": r.seconds})
        except TransferFailed as e:
            out = ("failed", str(e))
        with lock:
            conn.send((tag, out))

    while True:
        cmd = conn.recv()
        if cmd is None:
            break
        threading.Thread(target=run, args=cmd, daemon=True).start()
    sender.close()


class SenderProcess:
    def __init__(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child,), daemon=True)
        self.proc.start()
        self._results: dict[str, tuple] = {}
        if not self.conn.poll(120) or self.conn.recv()[0] != "ready":  # imports done: rooms may open
            raise RuntimeError("the sender process did not start")

    def submit(
        self,
        desc: dict,
        seed: int,
        shape: tuple,
        deadline_s: float | None = None,
        claim_s: float | None = None,
        abandon: bool = False,
    ) -> str:
        tag = uuid.uuid4().hex
        self.conn.send((tag, desc, seed, shape, deadline_s, claim_s, abandon))
        return tag

    def result(self, tag: str, timeout: float = 60.0) -> tuple[str, object]:
        while tag not in self._results:
            if not self.conn.poll(timeout):
                raise TimeoutError(f"no answer from the sender process for {tag}")
            t, out = self.conn.recv()
            self._results[t] = out
        return self._results.pop(tag)

    def send(
        self, desc: dict, seed: int, shape: tuple, deadline_s: float | None = None, timeout: float = 60.0
    ):
        return self.result(self.submit(desc, seed, shape, deadline_s), timeout)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)

    def close(self) -> None:
        if self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(10)
        if self.proc.is_alive():
            self.kill()
