"""`deepsplit bench serve`: our language server against transformers `generate` on one text workload.

Contenders on the same requests: our server (a real `language-server` process, driven over HTTP by
the openai client) at several concurrencies; HF `generate` one request at a time; HF `generate` on
left-padded batches. Reports output tokens/s, TTFT and TPOT p50/p99 (table, PNG, --json) and the
decode efficiency of one engine step against its weight-matmul roofline. Build the checkpoint first:
`deepsplit tiny-model --preset small --out .models/small`.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from deepsplit.bench import serve_report as report
from deepsplit.bench.serve_workload import make_workload


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=".models/small", help="checkpoint directory (small preset)")
    parser.add_argument("--quick", action="store_true", help="short run: 8 requests, shorter prompts/outputs")
    parser.add_argument("--requests", type=int, default=96, help="requests in the workload")
    parser.add_argument(
        "--sequential-requests",
        type=int,
        default=16,
        help="the one-at-a-time contenders (ours c=1, HF sequential) run only the first N "
        "requests: their tokens/s does not depend on N, their run time does",
    )
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    parser.add_argument(
        "--hf-batch", type=int, default=32, help="padded batch size of the HF batch contender"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for every contender")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="only our server (and the roofline)")
    parser.add_argument("--roofline-batch", type=int, default=32)
    parser.add_argument("--json", dest="json_out", help="write every figure to this file")
    parser.add_argument("--plot", help="PNG file for the plot (e.g. docs/serve.png)")
    parser.add_argument("--markdown", help="write the tables to this Markdown file")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, threads: int, max_seqs: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """A language server on a free port for a benchmark; returns (process, base URL) once healthy."""
    import httpx

    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "language_server.cli",
        "--model",
        model,
        "--port",
        str(port),
        "--threads",
        str(threads),
        "--served-model-name",
        "bench",
        "--max-num-seqs",
        str(max_seqs),
        "--kv-cache-bytes",
        str(1 << 30),
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"language-server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise RuntimeError("language-server did not become healthy")


def run(args: argparse.Namespace) -> int:
    from deepsplit.bench import serve_hf, serve_roofline
    from deepsplit.bench.serve_workload import drive

    if not Path(args.model, "config.json").is_file():
        print(f"no checkpoint at {args.model}: run `deepsplit tiny-model --preset small --out {args.model}`")
        return 2
    quick = args.quick
    n = 8 if quick else args.requests
    prompts, outputs = ((50, 200), (16, 64)) if quick else ((50, 500), (16, 256))
    conc = [int(c) for c in args.concurrency.split(",")]
    conc = [c for c in conc if c <= n] if quick else conc
    reqs = make_workload(n, prompts, outputs, args.seed)
    n_seq = min(n, args.sequential_requests)
    res: dict = {
        "model": args.model,
        "threads": args.threads,
        "requests": n,
        "prompt_range": prompts,
        "output_range": outputs,
        "asked_output_tokens": sum(r.max_tokens for r in reqs),
        "rows": [],
    }
    print(
        f"workload: {n} requests, prompts {prompts}, outputs {outputs}, "
        f"{res['asked_output_tokens']} output tokens; threads {args.threads}",
        flush=True,
    )

    # every concurrency replays the same requests and HF caches nothing: no prefix cache here
    # (`deepsplit bench prefix` measures it)
    proc, url = start_server(args.model, args.threads, max(64, max(conc)), "--no-enable-prefix-caching")
    try:
        drive(url, "bench", reqs[: min(2, n)], 2)  # warm-up
        for c in conc:
            samples, wall = drive(url, "bench", reqs[:n_seq] if c == 1 else reqs, c)
            row = report.summarize(f"deepsplit c={c}", samples, wall)
            res["rows"].append(row)
            print(report.table([row]).splitlines()[-1], flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    rb = min(args.roofline_batch, 8) if quick else args.roofline_batch
    res["decode"] = serve_roofline.measure(
        args.model, rb, 64 if quick else 256, 8 if quick else 24, args.threads
    )
    d = res["decode"]
    print(
        f"decode step at batch {rb}: {d['decode_step_s'] * 1000:.1f} ms; weight-matmul roofline "
        f"{d['roofline_s'] * 1000:.1f} ms; ratio {d['ratio']:.2f} ({_how(d)})",
        flush=True,
    )

    if not args.skip_hf:
        import torch

        torch.set_num_threads(args.threads)
        hf = serve_hf.load(args.model)
        samples, wall = serve_hf.sequential(hf, reqs[:n_seq])
        res["rows"].append(report.summarize("HF generate, sequential", samples, wall))
        print(report.table(res["rows"][-1:]).splitlines()[-1], flush=True)
        b = min(args.hf_batch, n)
        samples, wall = serve_hf.padded_batches(hf, reqs, b)
        res["rows"].append(report.summarize(f"HF generate, padded batch {b}", samples, wall))
        print(report.table(res["rows"][-1:]).splitlines()[-1], flush=True)
        by = {r["name"]: r["output_tok_s"] for r in res["rows"]}
        top = by.get(f"deepsplit c={max(conc)}")
        if top:
            res["ratios"] = {
                "vs_sequential": top / by["HF generate, sequential"],
                "vs_padded_batch": top / by[f"HF generate, padded batch {b}"],
            }

    title = f"{os.path.basename(os.path.abspath(args.model))}: {n} requests, {args.threads} threads"
    report.emit(res, _markdown(res), args, lambda path: report.plot(res["rows"], path, title))
    return 0


def _markdown(res: dict) -> str:
    out = [report.table(res["rows"])]
    if "ratios" in res:
        r = res["ratios"]
        out.append(
            f"\nours at top concurrency vs HF sequential: **{r['vs_sequential']:.1f}x**; "
            f"vs HF padded batch: **{r['vs_padded_batch']:.2f}x**"
        )
    d = res["decode"]
    parts = ", ".join(
        f"{k} {v * 1000:.1f}"
        for k, v in d["roofline_parts_s"].items()
        if k not in ("total", "fastest") and "[" not in k
    )
    out.append(
        f"\ndecode step at batch {d['batch']} (context {d['context']}): {d['decode_step_s'] * 1000:.1f} ms "
        f"(forward+sample {d['decode_forward_sample_s'] * 1000:.1f} ms); weight-matmul roofline "
        f"{d['roofline_s'] * 1000:.1f} ms ({parts} ms); ratio **{d['ratio']:.2f}** ({_how(d)})"
    )
    return "\n".join(out)


def _how(decode: dict) -> str:
    """Where the ratio comes from: the paired steps, else the median round; the rounds' ratios."""
    rounds = ", ".join(f"{r['ratio']:.2f}" for r in decode["rounds"])
    p = decode.get("paired")
    if p is None:
        return f"the median of {len(decode['rounds'])} alternating rounds: {rounds}"
    lo, hi = p["ratio_p10_p90"]
    return (
        f"median of {p['pairs']} steps, each paired with its roofline replayed right after; "
        f"p10-p90 {lo:.2f}-{hi:.2f}; whole rounds: {rounds}; parts from the median round"
    )
