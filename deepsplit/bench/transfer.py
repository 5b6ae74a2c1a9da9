"""`deepsplit bench transfer`: our push path per backend against raw Mooncake, raw ZMQ and memcpy.

For each payload size (64 KiB .. 256 MiB) in one run: our `TransferSender` -> `TransferReceiver` in
another process (the whole room exchange: handshake, writes, Done/Ack), Mooncake's bare
`transfer_sync_write` of the same bytes between two processes, bare ZMQ PUSH/PULL of the same bytes
with a one-byte ack back, and a local memcpy. Prints GiB/s and ratios; `--json FILE` keeps all.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time

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


def bench_ours(backend: str, sizes: list[int], args) -> dict[int, float]:
    from transfer import BufferSpec, ReceiverSettings, TransferReceiver, descriptor_to_builtins

    rows_max = max(peers.rows_for(s) for s in sizes)
    spec = BufferSpec(
        hidden=peers.HIDDEN, num_deepstack=peers.DEEPSTACK, block_size=256, num_blocks=-(-rows_max // 256)
    )
    rx = TransferReceiver(spec, ReceiverSettings(backend=backend))
    proc, conn = _spawn(peers.ours_sender)
    out = {}
    try:
        for s in sizes:
            rows, times = peers.rows_for(s), []
            for i in range(_reps(s, args) + 1):
                d = rx.open_room(rows)
                conn.send((descriptor_to_builtins(d), rows))
                dt = conn.recv()
                rx.wait_room(d.room, 60).release()
                if i:  # the first is warm-up
                    times.append(dt)
            out[s] = statistics.median(times)
    finally:
        conn.send(None)
        proc.join(10)
        rx.close()
    return out


def bench_raw_mooncake(sizes: list[int], args) -> dict[int, float]:
    from transfer.backends.mooncake_backend import _engine

    proc, conn = _spawn(peers.raw_mooncake_target, max(sizes))
    session, addr = conn.recv()
    eng = _engine("127.0.0.1", "tcp", "")
    src = torch.randn(max(sizes) // 4 + 1).view(torch.uint8)
    assert eng.register_memory(src.data_ptr(), src.numel()) == 0
    out = {}
    for s in sizes:
        times = []
        for i in range(_reps(s, args) + 1):
            t = time.perf_counter()
            assert eng.transfer_sync_write(session, src.data_ptr(), addr, s) == 0
            if i:
                times.append(time.perf_counter() - t)
        out[s] = statistics.median(times)
    conn.send(None)
    proc.join(10)
    return out


def bench_raw_zmq(sizes: list[int], args) -> dict[int, float]:
    import zmq

    proc, conn = _spawn(peers.raw_zmq_sink)
    ctx = zmq.Context()
    push, ack = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.connect(f"tcp://127.0.0.1:{conn.recv()}")
    port = ack.bind_to_random_port("tcp://127.0.0.1")
    conn.send(f"tcp://127.0.0.1:{port}")
    src = torch.randn(max(sizes) // 4 + 1).view(torch.uint8).numpy()
    out = {}
    for s in sizes:
        times = []
        for i in range(_reps(s, args) + 1):
            t = time.perf_counter()
            push.send(memoryview(src[:s]), copy=False)
            ack.recv()
            if i:
                times.append(time.perf_counter() - t)
        out[s] = statistics.median(times)
    push.send(b"")
    proc.join(10)
    ctx.destroy(0)
    return out


def bench_memcpy(sizes: list[int], args) -> dict[int, float]:
    import numpy as np

    src = torch.randn(max(sizes) // 4 + 1).view(torch.uint8).numpy()
    dst = np.empty_like(src)
    out = {}
    for s in sizes:
        times = []
        for i in range(_reps(s, args) + 1):
            t = time.perf_counter()
            np.copyto(dst[:s], src[:s])  # one thread, like the copies in the transfer paths
            if i:
                times.append(time.perf_counter() - t)
        out[s] = statistics.median(times)
    return out


def _gibs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 2**30


def run(args: argparse.Namespace) -> int:
    sizes = [_size(s) for s in args.sizes.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    # ours moves rows, not a byte count: its payload is the whole number of rows covering the size
    moved = {s: peers.rows_for(s) * peers.ROW_BYTES for s in sizes}
    secs: dict[str, dict[int, float]] = {"memcpy": bench_memcpy(sizes, args)}
    if "mooncake" in backends:
        secs["raw mooncake"] = bench_raw_mooncake(sizes, args)
        secs["ours mooncake"] = bench_ours("mooncake", sizes, args)
    if "zmq" in backends:
        secs["raw zmq"] = bench_raw_zmq(sizes, args)
        secs["ours zmq"] = bench_ours("zmq", sizes, args)
    rows = []
    for s in sizes:
        row = {"bytes": s, "ours_bytes": moved[s]}
        for name, t in secs.items():
            row[name] = {"seconds": t[s], "gib_s": _gibs(moved[s] if name.startswith("ours") else s, t[s])}
        for b in backends:
            row[f"ratio {b}"] = row[f"ours {b}"]["gib_s"] / row[f"raw {b}"]["gib_s"]
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
    big = [r for r in rows if r["bytes"] >= 2**20]
    for b in backends:
        if big:
            worst = min(r[f"ratio {b}"] for r in big)
            print(f"{b}: worst ours/raw for payloads >= 1 MiB: {worst:.2f} (goal >= 0.80)")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"payload_row_bytes": peers.ROW_BYTES, "rows": rows}, f, indent=1)
    return 0
