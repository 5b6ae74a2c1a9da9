"""`deepsplit bench transfer` end to end on tiny sizes: every contender runs in its own processes,
every series and ratio is reported, and the figures are consistent with each other."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_bench_transfer_reports_every_series(tmp_path):
    out = tmp_path / "t.json"
    cmd = [sys.executable, "-m", "deepsplit.cli", "bench", "transfer", "--sizes", "64K,1M"]
    cmd += ["--seconds", "0.01", "--max-reps", "3", "--gap-ms", "1", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "worst ours/raw for payloads >= 1 MiB" in res.stdout
    assert "raw mooncake polled (a reference, not ours)" in res.stdout
    assert "mooncake pieces (a reference, not ours)" in res.stdout and "bound mooncake" in res.stdout
    data = json.loads(out.read_text())
    assert [r["bytes"] for r in data["rows"]] == [64 * 1024, 1 << 20]
    series = ["memcpy", "raw mooncake", "raw mooncake polled", "mooncake pieces", "ours mooncake"]
    series += ["ours mooncake, rows ready"]
    series += ["ours mooncake claimed", "ours mooncake claimed, rows ready"]
    series += ["raw zmq", "raw zmq+copy", "zmq wire floor", "ours zmq", "ours zmq, rows ready"]
    for row in data["rows"]:
        assert row["ours_bytes"] >= row["bytes"]
        for s in series:
            assert row[s]["seconds"] > 0 and row[s]["gib_s"] > 0, (s, row[s])
        for b in ("mooncake", "zmq"):
            want = row[f"ours {b}"]["gib_s"] / row[f"raw {b}"]["gib_s"]
            assert row[f"ratio {b}"] == pytest.approx(want)
        want = row["zmq wire floor"]["gib_s"] / row["raw zmq"]["gib_s"]
        assert row["ratio zmq wire floor"] == pytest.approx(want)
        for ref in ("raw mooncake polled", "mooncake pieces"):
            want = row[ref]["gib_s"] / row["raw mooncake"]["gib_s"]
            assert row[f"ratio {ref}"] == pytest.approx(want)
        raw, pieces = row["raw mooncake"]["seconds"], row["mooncake pieces"]["seconds"]
        assert row["bound mooncake"] == pytest.approx(raw / (pieces + data["zmq_round_trip_after_gap_s"]))
        # the receiver verified the rows before the sender heard so: ready never after the Ack
        assert row["ours zmq, rows ready"]["seconds"] <= row["ours zmq"]["seconds"] * 1.5
    assert data["zmq_round_trip_s"] > 0 and data["zmq_round_trip_after_gap_s"] > 0
    assert "us after the 1 ms gap every contender waits" in res.stdout
