"""`deepsplit bench transfer`: our push path per backend against raw Mooncake, raw ZMQ and memcpy.

For each payload size (64 KiB .. 256 MiB) in one run: our `TransferSender` -> `TransferReceiver` in
another process (the whole room exchange: handshake if any, writes, Done/Ack), Mooncake's bare
`transfer_sync_write` of the same bytes between two processes, bare ZMQ PUSH/PULL of the same bytes
with a one-byte ack back, and a local memcpy. All contenders stay up for the whole run and take
turns, one repetition each, so the shared machine's slow phases hit them alike. Prints GiB/s and
ratios; `--json FILE` keeps all.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

import numpy as np
import torch

from deepsplit.bench import transfer_peers as peers

SIZES = "64K,256K,1M,4M,16M,64M,256M"
_UNIT = {"K": 2**10, "M": 2**20, "G": 2**30}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default=SIZES, help=f"payload sizes (default {SIZES})")
    parser.add_argument("--backends", default="mooncake,zmq")
    parser.add_argument("--seconds", type=float, default=0.6, help="time budget per size and contender")
    parser.add_argument("--max-reps", type=int, default=50)
    parser.add_argument("--json", dest="json_out", help="write every figure to this file")


def _size(s: str) -> int:
    return int(float(s[:-1]) * _UNIT[s[-1].upper()]) if s[-1].upper() in _UNIT else int(s)


def _reps(nbytes: int, args) -> int:
    return max(3, min(args.max_reps, int(args.seconds * 2**30 / max(nbytes, 1))))


def _spawn(target, *a):
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    p = ctx.Process(target=target, args=(theirs, *a), daemon=True)
    p.start()
    return p, mine


class Memcpy:
    """A local copy of the same bytes (one thread, like the copies in the transfer paths)."""

    def __init__(self, max_bytes: int) -> None:
        self.src = torch.randn(max_bytes // 4 + 1).view(torch.uint8).numpy()
        self.dst = np.empty_like(self.src)

    def once(self, nbytes: int) -> float:
        t = time.perf_counter()
        np.copyto(self.dst[:nbytes], self.src[:nbytes])
        return time.perf_counter() - t

    def close(self) -> None:
        pass


class RawMooncake:
    """Mooncake's bare `transfer_sync_write` into a buffer registered by another process."""

    def __init__(self, max_bytes: int) -> None:
        from transfer.backends.mooncake_backend import _engine

        self.proc, self.conn = _spawn(peers.raw_mooncake_target, max_bytes)
        self.session, self.addr = self.conn.recv()
        self.eng = _engine("127.0.0.1", "tcp", "")
        self.src = torch.randn(max_bytes // 4 + 1).view(torch.uint8)
        assert self.eng.register_memory(self.src.data_ptr(), self.src.numel()) == 0

    def once(self, nbytes: int) -> float:
        t = time.perf_counter()
        assert self.eng.transfer_sync_write(self.session, self.src.data_ptr(), self.addr, nbytes) == 0
        return time.perf_counter() - t

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)


class RawZmq:
    """Bare ZMQ PUSH of the bytes as one zero-copy frame to another process, which acks each (and,
    with `copy_into`, first copies the frame into a preallocated buffer, as a pool must)."""

    def __init__(self, max_bytes: int, copy_into: bool = False) -> None:
        import zmq

        self.proc, conn = _spawn(peers.raw_zmq_sink, max_bytes if copy_into else 0)
        self.ctx = zmq.Context()
        self.push, self.ack = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.PULL)
        self.push.connect(f"tcp://127.0.0.1:{conn.recv()}")
        port = self.ack.bind_to_random_port("tcp://127.0.0.1")
        conn.send(f"tcp://127.0.0.1:{port}")
        self.src = torch.randn(max_bytes // 4 + 1).view(torch.uint8).numpy()

    def once(self, nbytes: int) -> float:
        t = time.perf_counter()
        self.push.send(memoryview(self.src[:nbytes]), copy=False)
        self.ack.recv()
        return time.perf_counter() - t

    def close(self) -> None:
        self.push.send(b"")
        self.proc.join(10)
        self.ctx.destroy(0)


class Ours:
    """Our `TransferSender` in another process pushing a room into our `TransferReceiver` here; the
    time is the sender's whole `send` (handshake if any, writes, Done/Ack)."""

    def __init__(self, backend: str, sizes: list[int]) -> None:
        from transfer import BufferSpec, ReceiverSettings, TransferReceiver

        rows_max = max(peers.rows_for(s) for s in sizes)
        spec = BufferSpec(
            hidden=peers.HIDDEN, num_deepstack=peers.DEEPSTACK, block_size=256, num_blocks=-(-rows_max // 256)
        )
        self.rx = TransferReceiver(spec, ReceiverSettings(backend=backend))
        self.proc, self.conn = _spawn(peers.ours_sender)

    def once(self, nbytes: int) -> float:
        from transfer import descriptor_to_builtins

        rows = peers.rows_for(nbytes)
        d = self.rx.open_room(rows)
        self.conn.send((descriptor_to_builtins(d), rows))
        dt = self.conn.recv()
        self.rx.wait_room(d.room, 60).release()
        return dt

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)
        self.rx.close()


def measure(contenders: dict, sizes: list[int], args) -> dict[str, dict[int, float]]:
    """Median seconds per contender and size. Repetitions are interleaved (one of each contender in
    turn), so a slow phase of this shared machine hits every contender alike."""
    out: dict[str, dict[int, float]] = {name: {} for name in contenders}
    for s in sizes:
        times: dict[str, list[float]] = {name: [] for name in contenders}
        for i in range(_reps(s, args) + 1):
            for name, c in contenders.items():
                t = c.once(s)
                if i:  # the first round is warm-up
                    times[name].append(t)
        for name, ts in times.items():
            out[name][s] = statistics.median(ts)
    return out


def _gibs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 2**30


def run(args: argparse.Namespace) -> int:
    sizes = [_size(s) for s in args.sizes.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    # ours moves rows, not a byte count: its payload is the whole number of rows covering the size
    moved = {s: peers.rows_for(s) * peers.ROW_BYTES for s in sizes}
    contenders: dict = {"memcpy": Memcpy(max(sizes))}
    try:
        if "mooncake" in backends:
            contenders["raw mooncake"] = RawMooncake(max(sizes))
            contenders["ours mooncake"] = Ours("mooncake", sizes)
        if "zmq" in backends:
            contenders["raw zmq"] = RawZmq(max(sizes))
            contenders["raw zmq+copy"] = RawZmq(max(sizes), copy_into=True)
            contenders["ours zmq"] = Ours("zmq", sizes)
        rtt = None
        if "raw zmq" in contenders:  # the floor of any one control round trip between the two processes
            rtt = statistics.median(contenders["raw zmq"].once(1) for _ in range(300))
        secs = measure(contenders, sizes, args)
    finally:
        for c in contenders.values():
            c.close()
    rows = []
    for s in sizes:
        row = {"bytes": s, "ours_bytes": moved[s]}
        for name, t in secs.items():
            row[name] = {"seconds": t[s], "gib_s": _gibs(moved[s] if name.startswith("ours") else s, t[s])}
        for b in backends:
            row[f"ratio {b}"] = row[f"ours {b}"]["gib_s"] / row[f"raw {b}"]["gib_s"]
        if "zmq" in backends:
            row["ratio zmq vs raw+copy"] = row["ours zmq"]["gib_s"] / row["raw zmq+copy"]["gib_s"]
        rows.append(row)
    names = list(secs)
    print(
        f"{'size':>8} "
        + " ".join(f"{n:>14}" for n in names)
        + " "
        + " ".join(f"{'ours/raw ' + b:>18}" for b in backends)
    )
    for r in rows:
        size = f"{r['bytes'] / 2**20:.2f}M" if r["bytes"] >= 2**20 else f"{r['bytes'] // 1024}K"
        cells = " ".join(f"{r[n]['gib_s']:>9.2f} GiB/s" for n in names)
        ratios = " ".join(f"{r[f'ratio {b}']:>18.2f}" for b in backends)
        print(f"{size:>8} {cells} {ratios}")
    if rtt is not None:
        print(f"a 1-byte ZMQ round trip between the two processes: {rtt * 1e6:.0f} us (median)")
    big = [r for r in rows if r["bytes"] >= 2**20]
    for b in backends:
        if big:
            worst = min(r[f"ratio {b}"] for r in big)
            print(f"{b}: worst ours/raw for payloads >= 1 MiB: {worst:.2f} (goal >= 0.80)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {"payload_row_bytes": peers.ROW_BYTES, "zmq_round_trip_s": rtt, "rows": rows}, f, indent=1
            )
    return 0
