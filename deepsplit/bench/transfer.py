"""`deepsplit bench transfer`: our push path per backend against raw Mooncake, raw ZMQ and memcpy.

For each payload size (64 KiB .. 256 MiB) in one run: our `TransferSender` -> `TransferReceiver` in
another process, Mooncake's bare `transfer_sync_write` of the same bytes between two processes (and,
as references, the same write submitted and polled as our backend waits for its writes, and cut into
our backend's pieces with no control message: with the idle round trip, a bound for a room), bare
ZMQ PUSH/PULL of the same bytes with a one-byte ack back (also with the receive copy into a pool a
receiver of rows must make), the smallest Python exchange with our ZMQ wire shape ("zmq wire floor":
header + one frame per buffer into a pool, crc, ack; none of our bookkeeping), and a local memcpy.
Ours is timed two ways:
the sender's whole `send` (handshake if any, writes, Done/Ack) and "rows ready" (send began -> the
receiver verified the rows: what a request waits for); Mooncake also as an encoder runs it, the room
claimed while the vision tower computes (`claimed`: the handshake off the critical path). All
contenders stay up for the whole run and take turns, one repetition each, so the shared machine's
slow phases hit them alike. Prints GiB/s and ratios; `--json FILE` keeps all.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import time
import zlib

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
    parser.add_argument(
        "--gap-ms", type=float, default=5.0, help="idle time before each contender's repetition"
    )
    parser.add_argument(
        "--claim-ahead-ms",
        type=float,
        default=2.0,
        help="'claimed' contender: the room is claimed this long before send (a vision forward's stand-in)",
    )
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
    """Mooncake's bare `transfer_sync_write` into a buffer registered by another process; `polled`:
    the same single write submitted (`transfer_submit_write`) and polled as our backend polls (a
    reference: Mooncake's blocking calls spin a core until the write ends); `pieces`: also cut into
    pieces as our backend cuts a batch (its default settings), with no control message at all (a
    reference: what our room costs beyond its write)."""

    def __init__(self, max_bytes: int, polled: bool = False, pieces: bool = False) -> None:
        from transfer import SenderSettings
        from transfer.backends.mooncake_backend import _engine, split, wait

        self.proc, self.conn = _spawn(peers.raw_mooncake_target, max_bytes)
        self.session, self.addr = self.conn.recv()
        self.eng = _engine("127.0.0.1", "tcp", "")
        self.src = torch.randn(max_bytes // 4 + 1).view(torch.uint8)
        assert self.eng.register_memory(self.src.data_ptr(), self.src.numel()) == 0
        self.wait, self.split = (wait if polled or pieces else None), split
        settings = SenderSettings()
        self.pieces = (
            (settings.mooncake_write_pieces, settings.mooncake_min_piece_bytes) if pieces else (1, 0)
        )

    def once(self, nbytes: int) -> float:
        t = time.perf_counter()
        if self.wait is None:
            assert self.eng.transfer_sync_write(self.session, self.src.data_ptr(), self.addr, nbytes) == 0
        else:
            srcs, dsts, lens = self.split([(self.src.data_ptr(), self.addr, nbytes)], *self.pieces)
            batches = [
                self.eng.transfer_submit_write(self.session, a, b, n)
                for a, b, n in zip(srcs, dsts, lens, strict=True)
            ]
            assert all(batches) and self.wait(self.eng, batches, 60.0, self.session) == []
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


class ZmqWireFloor:
    """The smallest Python exchange with our ZMQ wire shape (`transfer_peers.zmq_wire_floor_sink`): a
    msgpack header and one zero-copy frame per buffer (ids, positions, vision rows, deepstack rows, a
    64-byte seal), received into a pool, a crc32 of ids and positions, a msgpack ack. What any Python
    implementation of this design pays on this machine before any of its bookkeeping."""

    def __init__(self, max_bytes: int) -> None:
        import msgspec
        import zmq

        from transfer.backends.zmq_backend import ZERO_COPY_MIN

        self.more, self.copy_below = zmq.SNDMORE, ZERO_COPY_MIN  # as our sender hands frames over
        self.cap = peers.rows_for(max_bytes) * peers.ROW_BYTES + 64
        self.proc, conn = _spawn(peers.zmq_wire_floor_sink, self.cap)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.connect(f"tcp://127.0.0.1:{conn.recv()}")
        self.src = torch.randn(self.cap // 4 + 1).view(torch.uint8).numpy()
        self.enc, self.dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder()

    def once(self, nbytes: int) -> float:
        n = peers.rows_for(nbytes)
        cuts = np.cumsum([0, 4 * n, 12 * n, 4 * peers.HIDDEN * n, 4 * peers.HIDDEN * peers.DEEPSTACK * n, 64])
        t = time.perf_counter()
        segments = [(int(a), int(b - a)) for a, b in zip(cuts, cuts[1:], strict=False)]
        crc = zlib.crc32(self.src[: cuts[2]])
        self.sock.send(self.enc.encode({"room": "r", "segments": segments, "crc": crc}), self.more)
        for i, (a, k) in enumerate(segments):
            more = self.more if i + 1 < len(segments) else 0
            self.sock.send(memoryview(self.src[a : a + k]), more, copy=k < self.copy_below)
        ack = self.dec.decode(self.sock.recv())
        dt = time.perf_counter() - t
        assert ack["ok"], ack
        return dt

    def close(self) -> None:
        self.sock.send(self.enc.encode(None))
        self.proc.join(10)
        self.ctx.destroy(0)


class Ours:
    """Our `TransferSender` in another process pushing a room into our `TransferReceiver` here.
    `once` gives the sender's `send` time and, under `<name>, rows ready`, the time from the start of
    `send` to the receiver's verified rows (both processes read the same monotonic clock)."""

    def __init__(self, backend: str, sizes: list[int], claim_ahead_s: float | None = None) -> None:
        from transfer import BufferSpec, ReceiverSettings, TransferReceiver

        rows_max = max(peers.rows_for(s) for s in sizes)
        spec = BufferSpec(
            hidden=peers.HIDDEN, num_deepstack=peers.DEEPSTACK, block_size=256, num_blocks=-(-rows_max // 256)
        )
        self.rx = TransferReceiver(spec, ReceiverSettings(backend=backend))
        self.proc, self.conn = _spawn(peers.ours_sender)
        self.claim_ahead_s = claim_ahead_s

    def once(self, nbytes: int) -> dict[str, float]:
        from transfer import descriptor_to_builtins

        rows = peers.rows_for(nbytes)
        d = self.rx.open_room(rows)
        self.conn.send((descriptor_to_builtins(d), rows, self.claim_ahead_s))
        dt, started = self.conn.recv()
        got = self.rx.wait_room(d.room, 60)
        got.release()
        return {"": dt, ", rows ready": got.ready_at - started}

    def close(self) -> None:
        self.conn.send(None)
        self.proc.join(10)
        self.rx.close()


def measure(contenders: dict, sizes: list[int], args) -> dict[str, dict[int, float]]:
    """Median seconds per series and size. Repetitions are interleaved (one of each contender in
    turn, each after the same idle gap), so a slow phase of this shared machine hits every
    contender alike. A contender whose
    `once` returns a dict adds a series per key (`name + key`)."""
    out: dict[str, dict[int, float]] = {}
    for s in sizes:
        times: dict[str, list[float]] = {}
        for i in range(_reps(s, args) + 1):
            for name, c in contenders.items():
                time.sleep(args.gap_ms / 1e3)  # the previous contender's processes settle, untimed
                t = c.once(s)
                for key, v in (t if isinstance(t, dict) else {"": t}).items():
                    if i:  # the first round is warm-up
                        times.setdefault(name + key, []).append(v)
        for name, ts in times.items():
            out.setdefault(name, {})[s] = statistics.median(ts)
    return out


def _after_gap(raw_zmq: RawZmq, args) -> float:
    time.sleep(args.gap_ms / 1e3)
    return raw_zmq.once(1)


def _gibs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 2**30


def _ratios(row: dict, backends: list[str]) -> dict[str, float]:
    """ours/raw GiB/s for every series of ours (sender view, rows ready, claimed), ours against raw
    ZMQ + copy, and two references against raw: the polled Mooncake write, the ZMQ wire floor."""
    out = {}
    for b in backends:
        for name in row:
            if name.startswith(f"ours {b}"):
                out[f"ratio {name[5:]}"] = row[name]["gib_s"] / row[f"raw {b}"]["gib_s"]
        if b == "mooncake":
            for ref in ("raw mooncake polled", "mooncake pieces"):
                out[f"ratio {ref}"] = row[ref]["gib_s"] / row["raw mooncake"]["gib_s"]
        if b == "zmq":
            out["ratio zmq vs raw+copy"] = row["ours zmq"]["gib_s"] / row["raw zmq+copy"]["gib_s"]
            out["ratio zmq wire floor"] = row["zmq wire floor"]["gib_s"] / row["raw zmq"]["gib_s"]
    return out


def run(args: argparse.Namespace) -> int:
    sizes = [_size(s) for s in args.sizes.split(",")]
    backends = [b for b in args.backends.split(",") if b]
    # ours moves rows, not a byte count: its payload is the whole number of rows covering the size
    moved = {s: peers.rows_for(s) * peers.ROW_BYTES for s in sizes}
    contenders: dict = {"memcpy": Memcpy(max(sizes))}
    try:
        if "mooncake" in backends:
            contenders["raw mooncake"] = RawMooncake(max(sizes))
            contenders["raw mooncake polled"] = RawMooncake(max(sizes), polled=True)
            contenders["mooncake pieces"] = RawMooncake(max(sizes), pieces=True)
            contenders["ours mooncake"] = Ours("mooncake", sizes)
            contenders["ours mooncake claimed"] = Ours(
                "mooncake", sizes, claim_ahead_s=args.claim_ahead_ms / 1e3
            )
        if "zmq" in backends:
            contenders["raw zmq"] = RawZmq(max(sizes))
            contenders["raw zmq+copy"] = RawZmq(max(sizes), copy_into=True)
            contenders["zmq wire floor"] = ZmqWireFloor(max(sizes))
            contenders["ours zmq"] = Ours("zmq", sizes)
        rtt = rtt_idle = None
        if "raw zmq" in contenders:  # the floor of any one control round trip between the two processes
            rtt = statistics.median(contenders["raw zmq"].once(1) for _ in range(300))
            rtt_idle = statistics.median(_after_gap(contenders["raw zmq"], args) for _ in range(60))
        secs = measure(contenders, sizes, args)
    finally:
        for c in contenders.values():
            c.close()
    rows = []
    for s in sizes:
        row = {"bytes": s, "ours_bytes": moved[s]}
        for name, t in secs.items():
            rows_moved = name.startswith(("ours", "zmq wire floor"))
            row[name] = {"seconds": t[s], "gib_s": _gibs(moved[s] if rows_moved else s, t[s])}
        row.update(_ratios(row, backends))
        if rtt_idle is not None and "mooncake pieces" in secs:  # no room with a round trip beats it
            row["bound mooncake"] = secs["raw mooncake"][s] / (secs["mooncake pieces"][s] + rtt_idle)
        rows.append(row)
    names = list(secs)
    print("GiB/s (medians); ours = the sender's send; 'rows ready' = send began -> receiver verified")
    for n in names:
        print(f"{n:>30} " + " ".join(f"{r[n]['gib_s']:>7.2f}" for r in rows))
    print(f"{'payload':>30} " + " ".join(f"{_label(r['bytes']):>7}" for r in rows))
    ratios = [k for k in rows[0] if k.startswith("ratio ")]
    for k in ratios:
        print(f"{k:>30} " + " ".join(f"{r[k]:>7.2f}" for r in rows))
    if rtt is not None:
        print(
            f"a 1-byte ZMQ round trip between the two processes: {rtt * 1e6:.0f} us back to back, "
            f"{rtt_idle * 1e6:.0f} us after the {args.gap_ms:g} ms gap every contender waits (medians)"
        )
    if rows and "bound mooncake" in rows[0]:
        print(
            f"{'bound mooncake':>30} "
            + " ".join(f"{r['bound mooncake']:>7.2f}" for r in rows)
            + "   (raw / (pieces + the idle round trip): what any room with a control round trip"
            " after its write could reach here)"
        )
    big = [r for r in rows if r["bytes"] >= 2**20]
    for k in ratios:
        if big and ("floor" in k or "polled" in k or "pieces" in k):
            print(
                f"{k[6:]} (a reference, not ours): lowest /raw for payloads >= 1 MiB: {min(r[k] for r in big):.2f}"
            )
        elif big:
            print(
                f"{k[6:]}: worst ours/raw for payloads >= 1 MiB: {min(r[k] for r in big):.2f} (goal >= 0.80)"
            )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {
                    "payload_row_bytes": peers.ROW_BYTES,
                    "zmq_round_trip_s": rtt,
                    "zmq_round_trip_after_gap_s": rtt_idle,
                    "claim_ahead_s": args.claim_ahead_ms / 1e3,
                    "rows": rows,
                },
                f,
                indent=1,
            )
    return 0


def _label(nbytes: int) -> str:
    return f"{nbytes // 2**20}M" if nbytes >= 2**20 else f"{nbytes // 1024}K"
