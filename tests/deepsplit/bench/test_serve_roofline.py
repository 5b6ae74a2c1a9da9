"""`deepsplit bench serve`'s decode efficiency on the tiny checkpoint: rounds, paired steps, parts."""

import statistics

import pytest

from deepsplit.bench import serve_roofline
from deepsplit.bench.serve import _how


@pytest.fixture(scope="module")
def decode(tiny_model_dir):
    return serve_roofline.measure(str(tiny_model_dir), batch=4, context=24, steps=6, threads=2, rounds=2)


def test_rounds_and_parts(decode):
    assert len(decode["rounds"]) == 2 and decode["batch"] == 4 and decode["context"] == 24
    for r in decode["rounds"]:
        parts = r["roofline_parts_s"]
        assert set(parts["fastest"]) >= {"attention_proj", "router", "experts", "lm_head"}
        for part, form in parts["fastest"].items():
            assert parts[part] == parts[f"{part}[{form}]"] > 0  # the fastest form is the one counted
            assert all(parts[part] <= v for k, v in parts.items() if k.startswith(part + "["))
        total = sum(parts[p] for p in ("attention_proj", "router", "experts", "dense_mlp", "lm_head"))
        assert r["roofline_s"] == pytest.approx(total)
        assert r["ratio"] == pytest.approx(r["decode_step_s"] / r["roofline_s"])


def test_ratio_is_the_median_of_paired_steps(decode):
    p = decode["paired"]
    # the first round only chooses the forms; the second pairs its decode steps after its first
    assert p["pairs"] == len(p["steps_s"]) == len(p["rooflines_s"]) >= 3
    ratios = [s / r for s, r in zip(p["steps_s"], p["rooflines_s"], strict=True)]
    assert decode["ratio"] == p["ratio"] == pytest.approx(statistics.median(ratios))
    lo, hi = p["ratio_p10_p90"]
    assert min(ratios) <= lo <= p["ratio"] <= hi <= max(ratios)
    assert 0 < p["decode_forward_sample_s"] <= p["decode_step_s"]  # the runner is inside each step
    assert decode["round_ratio"] in [r["ratio"] for r in decode["rounds"]]
    assert f"median of {p['pairs']} steps" in _how(decode)
