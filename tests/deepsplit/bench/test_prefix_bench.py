"""`deepsplit bench prefix` end to end on the tiny checkpoint: both servers run the same rounds, the
cached one counts hits only where prefixes repeat, and the ratios are the rows' own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from deepsplit.bench.prefix import workload

pytestmark = pytest.mark.slow


def test_the_workload_shares_each_prefix_among_its_questions():
    reqs = workload(3, 4, 64, 16, seed=1)
    assert len(reqs) == 12 and all(84 <= len(r.prompt) <= 124 and r.max_tokens == 16 for r in reqs)
    prefixes = {tuple(r.prompt[:64]) for r in reqs}
    assert len(prefixes) == 3 and len({tuple(r.prompt) for r in reqs}) == 12
    assert workload(3, 4, 64, 16, seed=2)[0].prompt[:64] not in [list(p) for p in prefixes]


def test_bench_prefix_reports_both_servers_and_their_ratios(tiny_model_dir, tmp_path):
    out = tmp_path / "p.json"
    cmd = [sys.executable, "-m", "deepsplit.cli", "bench", "prefix", "--model", str(tiny_model_dir)]
    cmd += ["--systems", "2", "--questions", "3", "--system-tokens", "128", "--max-tokens", "4"]
    cmd += ["--rounds", "2", "--concurrency", "1", "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert len(data["rounds"]) == 2
    for r in data["rounds"]:
        off, on = r["rows"]
        assert off["name"].startswith("cache off") and on["name"].startswith("cache on")
        assert off["requests"] == on["requests"] == 6 and off["output_tokens"] == on["output_tokens"] == 24
        assert off["hit_tokens"] == 0
        # one at a time: each prefix's 2nd and 3rd questions reuse its 128 tokens (8 blocks of 16)
        assert on["hit_tokens"] == 4 * 128 and 6 * (128 + 20) <= on["queried_tokens"] <= 6 * (128 + 60)
        assert r["tok_s_on_over_off"] == pytest.approx(on["output_tok_s"] / off["output_tok_s"])
    assert "| median |" in res.stdout
