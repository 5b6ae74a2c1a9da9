"""Summaries, the table and the plot of the serving benchmark (no measuring here)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from deepsplit.bench.serve_workload import Sample


def _pct(xs: list[float], p: float) -> float | None:
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def summarize(name: str, samples: list[Sample], wall: float) -> dict:
    tokens = sum(s.tokens for s in samples)
    ttft = [s.ttft for s in samples]
    tpot = [s.tpot for s in samples if s.tpot is not None]
    return {
        "name": name,
        "requests": len(samples),
        "output_tokens": tokens,
        "wall_s": wall,
        "output_tok_s": tokens / wall,
        "ttft_p50_s": _pct(ttft, 50),
        "ttft_p99_s": _pct(ttft, 99),
        "tpot_p50_s": _pct(tpot, 50),
        "tpot_p99_s": _pct(tpot, 99),
        "mean_latency_s": statistics.mean(s.latency for s in samples),
    }


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1000:.0f}"


def table(rows: list[dict]) -> str:
    lines = [
        "| contender | requests | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | TPOT p99 ms |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['requests']} | {r['output_tok_s']:.1f} | {_ms(r['ttft_p50_s'])} | "
            f"{_ms(r['ttft_p99_s'])} | {_ms(r['tpot_p50_s'])} | {_ms(r['tpot_p99_s'])} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    axes[0].barh(names, [r["output_tok_s"] for r in rows], color="tab:blue")
    axes[0].set_xlabel("output tokens / s (higher is better)")
    for ax, key, label in ((axes[1], "ttft", "TTFT"), (axes[2], "tpot", "TPOT")):
        p50 = [(r[f"{key}_p50_s"] or 0) * 1000 for r in rows]
        p99 = [(r[f"{key}_p99_s"] or 0) * 1000 for r in rows]
        y = range(len(rows))
        ax.barh([i + 0.2 for i in y], p50, height=0.4, label="p50")
        ax.barh([i - 0.2 for i in y], p99, height=0.4, label="p99")
        ax.set_yticks(list(y), names if ax is axes[1] else [""] * len(rows))
        ax.set_xlabel(f"{label} ms (lower is better)")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())  # log minor labels overlap on short ranges
        ax.legend()
    axes[2].set_yticks(list(range(len(rows))), [""] * len(rows))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def emit(res: dict, text: str, args, plot=None) -> None:
    """Print the markdown; write --json, --markdown and (via `plot(path)`) --plot when asked."""
    print("\n" + text)
    if getattr(args, "json_out", None):
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    if getattr(args, "markdown", None):
        Path(args.markdown).write_text(text + "\n")
    if getattr(args, "plot", None) and plot is not None:
        plot(args.plot)
