"""`deepsplit bench serve-images`: image+text chat serving, disaggregated vs monolithic vs HF `generate`.

Contenders on the same image workload (1-2 random-noise PNGs of distinct content per request, short
text, 16-64 output tokens): a disaggregated cluster (`deepsplit.cluster.Cluster`: encode servers +
one language server) with 1 and 2 encoders over ZMQ (and Mooncake), a monolithic language server,
and transformers `generate` one request at a time. Reports TTFT/TPOT p50/p99, output tok/s and
requests/s at concurrency 1 and 16, the encoder-side time of an embedding-cache miss vs hit (from
the encoder's /metrics histogram), and the three goal ratios. It measures; it changes no server.
The workload, the HTTP driver and the probes live in `serve_images_workload.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from deepsplit.bench import serve_report as report
from deepsplit.bench.serve_images_workload import (
    CpuMeter,
    ImageReq,
    cache_probe,
    drive_chat,
    make_image_workload,
    port_base,
)
from deepsplit.bench.serve_workload import Sample

GOALS = {"a": 1.15, "b": 0.1, "c": 1.0}
QUICK_CONTENDERS, CONTENDERS = "mono,zmq1,zmq2", "mono,zmq1,zmq2,mooncake1"


def summarize(name: str, samples: list[Sample], wall: float, failed: int, cpu: dict) -> dict:
    row = report.summarize(name, samples, wall)
    row.update(req_s=len(samples) / wall, failed=failed, cpu=cpu, ttft_s=[x.ttft for x in samples])
    # the host is shared: completed requests per core of CPU our processes actually got
    row["req_s_per_core"] = row["req_s"] / cpu["ours_cores"] if cpu.get("ours_cores") else None
    return row


def goals(
    rows: list[dict], cache: dict | None, mono: str, disagg_1: list[str], disagg_all: list[str], conc: int
) -> dict:
    """The three goal ratios from summary rows named '<contender> c=<n>'. A run in which any request
    failed gives no figure (its survivors ran on a lighter load); None where a figure is missing."""
    by = {r["name"]: r for r in rows}

    def get(name, key):
        r = by.get(name)
        return r[key] if r and r.get(key) is not None and not r.get("failed") else None

    out: dict = {}
    m1, m16 = get(f"{mono} c=1", "ttft_p50_s"), get(f"{mono} c={conc}", "req_s")
    for d in disagg_1:
        d1 = get(f"{d} c=1", "ttft_p50_s")
        out[f"a_ttft_p50_c1 {d} / {mono}"] = d1 / m1 if d1 and m1 else None
    if cache and cache.get("miss_s"):
        out["b_cache_hit / miss (encoder-side)"] = cache["hit_s"] / cache["miss_s"]
    best = max(
        ((get(f"{d} c={conc}", "req_s"), d) for d in disagg_all if get(f"{d} c={conc}", "req_s")),
        default=None,
    )
    if best:
        out[f"c_req_s_c{conc} best disaggregated ({best[1]}) / {mono}"] = best[0] / m16 if m16 else None
    elif disagg_all:
        out[f"c_req_s_c{conc} best disaggregated (no failure-free run) / {mono}"] = None
    return out


def goal_met(key: str, value: float | None) -> bool | None:
    if value is None:
        return None
    g = GOALS[key[0]]
    return value >= g if key[0] == "c" else value <= g


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cores = os.cpu_count() or 2
    parser.add_argument("--model", default=".models/small", help="checkpoint directory (small preset)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 small-image requests, c=1,4")
    parser.add_argument("--requests", type=int, default=32, help="requests of the concurrent run")
    parser.add_argument("--sequential-requests", type=int, default=6, help="requests of the c=1 runs")
    parser.add_argument("--concurrency", type=int, default=16, help="the concurrent run's concurrency")
    parser.add_argument(
        "--contenders",
        help=f"server contenders: mono | <backend><encoders> (default {CONTENDERS}; --quick: "
        f"{QUICK_CONTENDERS})",
    )
    parser.add_argument("--skip-hf", action="store_true", help="no transformers generate contender")
    parser.add_argument("--cores", type=int, default=cores, help="CPU cores the thread counts divide")
    parser.add_argument("--mono-threads", type=int, help="monolithic server threads (default: cores)")
    parser.add_argument("--lang-threads", type=int, help="disaggregated language threads (default: cores)")
    parser.add_argument(
        "--encoder-threads", type=int, help="threads per encoder (default: cores // encoders, at least 1)"
    )
    parser.add_argument("--hf-threads", type=int, help="HF generate threads (default: cores)")
    parser.add_argument("--cache-hits", type=int, default=3, help="repeats of the cached request")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", help="server logs (default: a temporary directory)")
    parser.add_argument("--json", dest="json_out", help="write every figure to this file")
    parser.add_argument("--plot", help="PNG file for the plot")
    parser.add_argument("--markdown", help="write the tables to this Markdown file")


def tree_state() -> dict | None:
    """HEAD and a digest of uncommitted changes: the tree may change under a long run (shared checkout)."""
    import hashlib
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        diff = subprocess.run(["git", "diff", "HEAD"], capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return {"head": head.stdout.strip(), "diff_sha1": hashlib.sha1(diff).hexdigest()[:12] if diff else None}


def _threads(args, encoders: int) -> tuple[int, int]:
    """(language or monolithic threads, threads per encoder)."""
    if encoders == 0:
        return args.mono_threads or args.cores, 0
    return args.lang_threads or args.cores, args.encoder_threads or max(1, args.cores // encoders)


def _parse_contender(name: str) -> tuple[int, str | None]:
    if name == "mono":
        return 0, None
    backend = name.rstrip("0123456789")
    if backend not in ("zmq", "mooncake") or backend == name:
        raise ValueError(f"unknown contender {name!r}: mono | zmq<N> | mooncake<N>")
    return int(name[len(backend) :]), backend


def run_server_contender(name: str, args, work: dict, log_dir: str) -> tuple[list[dict], dict]:
    from deepsplit.cluster import Cluster, ClusterSettings

    n_enc, backend = _parse_contender(name)
    lt, et = _threads(args, n_enc)
    base = port_base(n_enc + 1)
    lang = ["--threads", str(lt), "--served-model-name", "bench", "--max-num-seqs", "64"]
    lang += ["--kv-cache-bytes", str(1 << 30), "--log-level", "warning"]
    lang += ["--no-enable-prefix-caching"]  # both concurrencies replay one workload; HF caches nothing
    if n_enc:
        lang += ["--mm-buffer-bytes", str(512 << 20), "--transfer-port", "0"]
    s = ClusterSettings(
        model=args.model,
        encoders=n_enc,
        languages=1,
        backend=backend or "zmq",
        language_base_port=base,
        encoder_base_port=base + 1,
        encode_config=None,
        language_config=None,
        router="none",
        encoder_args=["--threads", str(et), "--log-level", "warning"],
        language_args=lang,
        ready_timeout_s=300,
    )
    info = {"encoders": n_enc, "backend": backend, "language_threads": lt, "encoder_threads": et}
    print(f"[{name}] starting: {info}", flush=True)
    rows, extra = [], {"threads": info, "tree": tree_state()}
    t = time.perf_counter()
    with Cluster(s, Path(log_dir) / name) as cluster:
        extra["start_s"] = time.perf_counter() - t
        url = cluster.endpoint
        pids = [os.getpid()] + [p.pid for _, p in cluster.procs]
        drive_chat(url, work["warm"], 2)
        for c, reqs in ((1, work["seq"]), (args.concurrency, work["conc"])):
            meter = CpuMeter(pids).start()
            samples, wall, failed = drive_chat(url, reqs, c)
            rows.append(summarize(f"{name} c={c}", samples, wall, failed, meter.stop()))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
            if c == 1 and n_enc == 1:  # while the encoder is idle: no backlog in front of the probe
                extra.update(_cache(name, url, cluster.encoder_urls[0], work["cache"], args.cache_hits))
    return rows, extra


def _cache(name: str, url: str, encoder_url: str, req: ImageReq, hits: int) -> dict:
    try:
        cp = cache_probe(url, encoder_url, req, hits)
    except Exception as e:  # noqa: BLE001 - keep the contender's other figures
        print(f"[{name}] cache probe failed: {e}", flush=True)
        return {"cache_error": f"{type(e).__name__}: {e}"}
    print(
        f"[{name}] cache: miss {cp['miss_s'] * 1000:.0f} ms, hit {cp['hit_s'] * 1000:.1f} ms "
        f"(encoder-side); TTFT miss {cp['miss_ttft_s'] * 1000:.0f} ms, hit {cp['hit_ttft_s'] * 1000:.0f} ms",
        flush=True,
    )
    return {"cache": cp}


def hf_sequential(model_dir: str, reqs: list[ImageReq], threads: int) -> tuple[list[Sample], float]:
    """transformers generate, one request at a time, inputs built by our Preprocessor from the PNG
    bytes; the timed span starts before the PNGs are decoded, as a server's does."""
    import torch
    from transformers import LogitsProcessorList

    from deepsplit.bench import serve_hf
    from deepsplit.images import ImageLimits, load_image
    from deepsplit.model.config import ModelConfig
    from deepsplit.model.processor import Preprocessor

    torch.set_num_threads(threads)
    hf = serve_hf.load(model_dir)
    pre, cfg = Preprocessor.from_dir(model_dir), ModelConfig.from_dir(model_dir)
    out = []
    t_all = time.perf_counter()
    for r in reqs:
        clock = serve_hf._Clock()
        t0 = time.perf_counter()
        images = [load_image(u, ImageLimits())[0] for u in r.urls]
        p = pre.prepare(r.messages(for_hf=True), images)
        ids = torch.tensor([p.input_ids])
        with torch.no_grad():
            hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=p.pixel_values,
                image_grid_thw=torch.tensor(p.grid_thw),
                mm_token_type_ids=(ids == cfg.image_token_id).int(),
                max_new_tokens=r.max_tokens,
                min_new_tokens=r.max_tokens,
                do_sample=False,
                logits_processor=LogitsProcessorList([clock]),
                pad_token_id=0,
            )
        end, s = time.perf_counter(), clock.stamps
        tpot = (s[-1] - s[0]) / (len(s) - 1) if len(s) > 1 else None
        out.append(Sample(s[0] - t0, tpot, r.max_tokens, end - t0))
    return out, time.perf_counter() - t_all


def run(args: argparse.Namespace) -> int:
    if not Path(args.model, "config.json").is_file():
        print(f"no checkpoint at {args.model}: run `deepsplit tiny-model --preset small --out {args.model}`")
        return 2
    t_start = time.perf_counter()
    q = args.quick
    contenders = [c for c in (args.contenders or (QUICK_CONTENDERS if q else CONTENDERS)).split(",") if c]
    for c in contenders:
        _parse_contender(c)
    if q:
        args.requests, args.sequential_requests, args.concurrency = 4, 2, 4
    sides, n_img, outs = ((256, 384), (1, 2), (16, 32)) if q else ((256, 1024), (1, 2), (16, 64))
    mk = lambda n, tag, s=sides: make_image_workload(n, s, n_img, outs, args.seed, tag)  # noqa: E731
    work = {
        "warm": mk(2, 1, (256, 256)),
        "seq": mk(args.sequential_requests, 2),
        "conc": mk(args.requests, 3),
        # its own fresh image: its first request is a cache miss on every encoder
        "cache": make_image_workload(1, (512, 512) if q else (1024, 1024), (1, 1), (1, 1), args.seed, 4)[0],
    }
    res: dict = {
        "model": args.model,
        "cores": args.cores,
        "quick": q,
        "workload": {
            "image_side_range": sides,
            "images_per_request": n_img,
            "output_range": outs,
            "sequential_requests": args.sequential_requests,
            "concurrent_requests": args.requests,
            "concurrency": args.concurrency,
            "seq_images": sum(len(r.urls) for r in work["seq"]),
            "conc_images": sum(len(r.urls) for r in work["conc"]),
            "seq_output_tokens": sum(r.max_tokens for r in work["seq"]),
            "conc_output_tokens": sum(r.max_tokens for r in work["conc"]),
        },
        "rows": [],
        "contenders": {},
    }
    print(f"workload: {json.dumps(res['workload'])}", flush=True)
    log_dir = args.log_dir or tempfile.mkdtemp(prefix="serve-images-")
    print(f"server logs in {log_dir}", flush=True)
    for name in contenders:
        try:
            rows, extra = run_server_contender(name, args, work, log_dir)
        except Exception as e:  # noqa: BLE001 - one broken contender must not lose the others
            print(f"[{name}] FAILED: {type(e).__name__}: {e} (logs in {log_dir}/{name})", flush=True)
            res["contenders"][name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        res["rows"] += rows
        res["contenders"][name] = extra
        if "cache" in extra and "cache" not in res:
            res["cache"] = {"contender": name, **extra["cache"]}
    if not args.skip_hf:
        ht = args.hf_threads or args.cores
        meter = CpuMeter([os.getpid()]).start()  # the model load is outside the timed requests
        samples, wall = hf_sequential(args.model, work["seq"], ht)
        res["rows"].append(summarize("HF generate c=1", samples, wall, 0, meter.stop()))
        res["contenders"]["HF generate"] = {"threads": {"torch_threads": ht}, "tree": tree_state()}
        print(_table(res["rows"][-1:]).splitlines()[-1], flush=True)
    disagg = [c for c in contenders if c != "mono"]
    one = [c for c in disagg if _parse_contender(c)[0] == 1]
    res["ratios"] = goals(res["rows"], res.get("cache"), "mono", one, disagg, args.concurrency)
    res["goals_met"] = {k: goal_met(k, v) for k, v in res["ratios"].items()}
    res["run_s"] = time.perf_counter() - t_start
    trees = {json.dumps(c.get("tree")) for c in res["contenders"].values() if "tree" in c}
    if len(trees) > 1:
        print("warning: the source tree changed during the run (see contenders.*.tree)", flush=True)
    report.emit(res, _markdown(res), args, lambda path: plot(res, path))
    return 0


def _table(rows: list[dict]) -> str:
    lines = report.table(rows).splitlines()
    lines[0] += " req/s | failed | CPU ours / others (cores) |"
    lines[1] += "---:|---:|---:|"
    for i, r in enumerate(rows):
        cpu = f"{r['cpu']['ours_cores']:.2f} / {r['cpu']['others_cores']:.2f}"
        lines[2 + i] += f" {r['req_s']:.3f} | {r['failed']} | {cpu} |"
    return "\n".join(lines)


def _markdown(res: dict) -> str:
    out = [_table(res["rows"]), ""]
    if "cache" in res:
        c = res["cache"]
        out.append(
            f"embedding cache ({c['contender']}, one {c['image_sizes'][0][0]}x{c['image_sizes'][0][1]} image): "
            f"encoder-side time (received -> rows written) miss {c['miss_s'] * 1000:.0f} ms, "
            f"hit {c['hit_s'] * 1000:.1f} ms (median of {len(c['hit_all_s'])}); client TTFT miss "
            f"{c['miss_ttft_s'] * 1000:.0f} ms, hit {c['hit_ttft_s'] * 1000:.0f} ms\n"
        )
    threads = "; ".join(
        f"{k}: " + ", ".join(f"{t} {v}" for t, v in c["threads"].items() if v and t not in ("backend",))
        for k, c in res["contenders"].items()
        if "threads" in c
    )
    out.append(f"threads per process: {threads}\n")
    if any(r.get("failed") for r in res["rows"]):
        out.append("A run with failed requests gives no goal figure (its survivors ran on a lighter load).\n")
    out += ["| goal | ratio | target | met |", "|---|---:|---:|---|"]
    for k, v in res["ratios"].items():
        target = ("<= " if k[0] != "c" else ">= ") + str(GOALS[k[0]])
        met = {True: "yes", False: "**no**", None: "—"}[res["goals_met"][k]]
        out.append(f"| ({k[0]}) {k[2:]} | {'—' if v is None else f'{v:.3f}'} | {target} | {met} |")
    return "\n".join(out)


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    rows = res["rows"]
    names = [r["name"] + (f" ({r['failed']} failed)" if r.get("failed") else "") for r in rows]
    y = range(len(rows))
    fig, axes = plt.subplots(1, 4, figsize=(19, 0.45 * len(rows) + 2.5))
    colors = ["tab:gray" if r.get("failed") else "tab:blue" for r in rows]
    axes[0].barh(names, [r["req_s"] for r in rows], color=colors)
    axes[0].set_xlabel("completed requests / s (grey: some failed)")
    for ax, key, label in ((axes[1], "ttft", "TTFT"), (axes[2], "tpot", "TPOT")):
        ax.barh(
            [i + 0.2 for i in y], [(r[f"{key}_p50_s"] or 0) * 1000 for r in rows], height=0.4, label="p50"
        )
        ax.barh(
            [i - 0.2 for i in y], [(r[f"{key}_p99_s"] or 0) * 1000 for r in rows], height=0.4, label="p99"
        )
        ax.set_yticks(list(y), [""] * len(rows))
        ax.set_xlabel(f"{label} ms (lower is better)")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.legend()
    if "cache" in res:
        c = res["cache"]
        axes[3].bar(["miss", "hit"], [c["miss_s"] * 1000, c["hit_s"] * 1000], color=["tab:red", "tab:green"])
        axes[3].set_yscale("log")
        axes[3].set_ylabel("encoder-side ms, received -> rows written")
        h, w = c["image_sizes"][0]
        axes[3].set_title(f"embedding cache, {c['contender']}, {h}x{w}")
    fig.suptitle(
        f"{os.path.basename(os.path.abspath(res['model']))}: image chat serving on {res['cores']} cores "
        f"(c=1: {res['workload']['sequential_requests']} requests, "
        f"c={res['workload']['concurrency']}: {res['workload']['concurrent_requests']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
