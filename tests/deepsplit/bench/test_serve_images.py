"""Pure helpers of `deepsplit bench serve-images`: workload, Prometheus parsing, goal ratios."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from deepsplit.bench.serve_images import _parse_contender, _threads, goal_met, goals
from deepsplit.bench.serve_images_workload import gauge, histogram_sum_count, make_image_workload

METRICS = """# HELP deepsplit_encode_total_seconds request received -> rows written
# TYPE deepsplit_encode_total_seconds histogram
deepsplit_encode_total_seconds_bucket{le="0.005"} 0.0
deepsplit_encode_total_seconds_bucket{le="+Inf"} 3.0
deepsplit_encode_total_seconds_count 3.0
deepsplit_encode_total_seconds_sum 5.25
deepsplit_encode_compute_seconds_count 7.0
deepsplit_encode_compute_seconds_sum 1.5
deepsplit_encode_cache_hits 2.0
"""


def _decode(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_workload_is_deterministic_in_range_and_distinct():
    a = make_image_workload(6, (256, 384), (1, 2), (16, 32), seed=0, tag=2)
    b = make_image_workload(6, (256, 384), (1, 2), (16, 32), seed=0, tag=2)
    assert [r.urls for r in a] == [r.urls for r in b]
    urls = [u for r in a for u in r.urls]
    assert len(set(urls)) == len(urls)  # distinct content: no embedding-cache hits inside the workload
    for r in a:
        assert 1 <= len(r.urls) <= 2 and 16 <= r.max_tokens <= 32
        for (h, w), u in zip(r.sizes, r.urls, strict=True):
            assert 256 <= h <= 384 and 256 <= w <= 384 and h % 32 == w % 32 == 0
            assert _decode(u).size == (w, h)
    other = make_image_workload(6, (256, 384), (1, 2), (16, 32), seed=0, tag=3)
    assert not set(urls) & {u for r in other for u in r.urls}  # sets with different tags share no image


def test_messages_put_images_before_text():
    (r,) = make_image_workload(1, (256, 256), (2, 2), (16, 16), seed=1, tag=0)
    parts = r.messages()[0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert [p["type"] for p in r.messages(for_hf=True)[0]["content"]] == ["image", "image", "text"]


def test_prometheus_parsing():
    assert histogram_sum_count(METRICS, "deepsplit_encode_total_seconds") == (5.25, 3.0)
    assert histogram_sum_count(METRICS, "missing") == (0.0, 0.0)
    assert gauge(METRICS, "deepsplit_encode_cache_hits") == 2.0


def _row(name, ttft=None, req_s=None):
    return {"name": name, "ttft_p50_s": ttft, "req_s": req_s}


def test_goal_ratios_and_verdicts():
    rows = [
        _row("mono c=1", ttft=1.0),
        _row("mono c=16", req_s=0.5),
        _row("zmq1 c=1", ttft=1.1),
        _row("zmq1 c=16", req_s=0.4),
        _row("zmq2 c=16", req_s=0.6),
    ]
    r = goals(rows, {"miss_s": 5.0, "hit_s": 0.05}, "mono", ["zmq1"], ["zmq1", "zmq2"], 16)
    assert r["a_ttft_p50_c1 zmq1 / mono"] == pytest.approx(1.1)
    assert r["b_cache_hit / miss (encoder-side)"] == pytest.approx(0.01)
    assert r["c_req_s_c16 best disaggregated (zmq2) / mono"] == pytest.approx(1.2)
    assert {k[0]: goal_met(k, v) for k, v in r.items()} == {"a": True, "b": True, "c": True}
    assert goal_met("a_x", 1.2) is False and goal_met("c_x", 0.9) is False and goal_met("b_x", None) is None


def test_runs_with_failed_requests_give_no_figure():
    rows = [
        _row("mono c=1", ttft=1.0),
        _row("mono c=16", req_s=0.5),
        {**_row("zmq1 c=1", ttft=0.5), "failed": 1},
        {**_row("zmq1 c=16", req_s=0.9), "failed": 3},
        _row("zmq2 c=16", req_s=0.4),
    ]
    r = goals(rows, None, "mono", ["zmq1"], ["zmq1", "zmq2"], 16)
    assert r["a_ttft_p50_c1 zmq1 / mono"] is None
    assert r["c_req_s_c16 best disaggregated (zmq2) / mono"] == pytest.approx(0.8)
    rows[-1]["failed"] = 2
    r = goals(rows, None, "mono", ["zmq1"], ["zmq1", "zmq2"], 16)
    assert r["c_req_s_c16 best disaggregated (no failure-free run) / mono"] is None


def test_missing_figures_give_no_ratio():
    r = goals([_row("zmq1 c=1", ttft=1.0)], None, "mono", ["zmq1"], ["zmq1"], 16)
    assert r == {
        "a_ttft_p50_c1 zmq1 / mono": None,
        "c_req_s_c16 best disaggregated (no failure-free run) / mono": None,
    }


def test_contender_names_and_threads():
    assert _parse_contender("mono") == (0, None)
    assert _parse_contender("zmq2") == (2, "zmq")
    assert _parse_contender("mooncake1") == (1, "mooncake")
    for bad in ("zmq", "tcp1", "1"):
        with pytest.raises(ValueError):
            _parse_contender(bad)

    class A:
        cores, mono_threads, lang_threads, encoder_threads = 2, None, None, None

    assert _threads(A, 0) == (2, 0)
    assert _threads(A, 1) == (2, 2)
    assert _threads(A, 2) == (2, 1)
    assert _threads(A, 4) == (2, 1)
