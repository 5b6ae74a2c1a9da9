"""`deepsplit bench prefix`: the language server with its prefix cache on against the same server
with it off, on requests that share long prefixes.

Workload per round: `--systems` distinct system prompts of `--system-tokens` token ids, each followed
by `--questions` distinct questions of 20-60 tokens, in random order, 16 greedy output tokens each,
streamed at `--concurrency` with the openai client (as `bench serve` drives them). Each round draws
new system prompts (nothing a round before cached helps the next) and runs the two servers one after
the other, alternating which goes first; both servers are started once and warmed. Reports TTFT
p50/p99, output tok/s and wall per contender and round, the on/off ratios of each round and their
medians (same-run ratios: this VM is shared and noisy), and the hit rate the cached server's
/metrics counted. Build the checkpoint first: `deepsplit tiny-model --preset small --out .models/small`.
"""

from __future__ import annotations

import argparse
import random
import statistics
from pathlib import Path

from deepsplit.bench import serve_report as report
from deepsplit.bench.serve import start_server
from deepsplit.bench.serve_workload import Req, drive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=".models/small", help="checkpoint directory (small preset)")
    parser.add_argument("--systems", type=int, default=4, help="distinct shared prefixes per round")
    parser.add_argument("--questions", type=int, default=8, help="requests sharing each prefix")
    parser.add_argument("--system-tokens", type=int, default=512, help="length of each shared prefix")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 prefixes x 4 questions, 1 round")
    parser.add_argument("--json", dest="json_out", help="write every figure to this file")
    parser.add_argument("--markdown", help="write the tables to this Markdown file")


def workload(systems: int, questions: int, system_tokens: int, max_tokens: int, seed: int) -> list[Req]:
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(1000, 150000) for _ in range(n)]  # noqa: E731
    reqs = [
        Req(prefix + tok(rng.randint(20, 60)), max_tokens)
        for prefix in (tok(system_tokens) for _ in range(systems))
        for _ in range(questions)
    ]
    rng.shuffle(reqs)
    return reqs


def _hits(url: str) -> tuple[float, float]:
    import httpx

    text = httpx.get(url + "/metrics", timeout=10).text
    got = {}
    for line in text.splitlines():
        for key in ("prefix_cache_hit_tokens", "prefix_cache_queried_tokens"):
            if line.startswith(f"deepsplit_language_{key} "):
                got[key] = float(line.split()[1])
    return got.get("prefix_cache_hit_tokens", 0.0), got.get("prefix_cache_queried_tokens", 0.0)


def run(args: argparse.Namespace) -> int:
    if not Path(args.model, "config.json").is_file():
        print(f"no checkpoint at {args.model}: run `deepsplit tiny-model --preset small --out {args.model}`")
        return 2
    if args.quick:
        args.systems, args.questions, args.rounds = 2, 4, 1
    n = args.systems * args.questions
    print(
        f"workload: {args.systems} prefixes of {args.system_tokens} tokens x {args.questions} questions "
        f"(20-60 tokens), {args.max_tokens} output tokens, concurrency {args.concurrency}, "
        f"{args.rounds} rounds; threads {args.threads}",
        flush=True,
    )
    servers = {
        "cache off": start_server(args.model, args.threads, 64, "--no-enable-prefix-caching"),
        "cache on": start_server(args.model, args.threads, 64, "--enable-prefix-caching"),
    }
    res: dict = {"model": args.model, "requests_per_round": n, "args": vars(args).copy(), "rounds": []}
    try:
        warm = workload(1, 2, args.system_tokens, 4, args.seed + 10_000)
        for _, url in servers.values():
            drive(url, "bench", warm, 2)
        for k in range(args.rounds):
            reqs = workload(args.systems, args.questions, args.system_tokens, args.max_tokens, args.seed + k)
            order = list(servers) if k % 2 == 0 else list(servers)[::-1]
            rows = {}
            for name in order:
                url = servers[name][1]
                before = _hits(url)
                samples, wall = drive(url, "bench", reqs, args.concurrency)
                after = _hits(url)
                row = report.summarize(f"{name}, round {k + 1}", samples, wall)
                row["hit_tokens"], row["queried_tokens"] = after[0] - before[0], after[1] - before[1]
                row["hit_rate"] = row["hit_tokens"] / max(1.0, row["queried_tokens"])
                rows[name] = row
                print(report.table([row]).splitlines()[-1] + f" hit rate {row['hit_rate']:.2f}", flush=True)
            on, off = rows["cache on"], rows["cache off"]
            res["rounds"].append(
                {
                    "rows": [off, on],
                    "ttft_p50_off_over_on": off["ttft_p50_s"] / on["ttft_p50_s"],
                    "tok_s_on_over_off": on["output_tok_s"] / off["output_tok_s"],
                    "wall_off_over_on": off["wall_s"] / on["wall_s"],
                }
            )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    res["median"] = {
        key: statistics.median(r[key] for r in res["rounds"])
        for key in ("ttft_p50_off_over_on", "tok_s_on_over_off", "wall_off_over_on")
    }
    report.emit(res, _markdown(res), args)
    return 0


def _markdown(res: dict) -> str:
    rows = [row for r in res["rounds"] for row in r["rows"]]
    out = [
        report.table(rows),
        "",
        "| round | TTFT p50 off/on | output tok/s on/off | wall off/on | hit rate |",
    ]
    out.append("|---|---:|---:|---:|---:|")
    for i, r in enumerate(res["rounds"], 1):
        out.append(
            f"| {i} | {r['ttft_p50_off_over_on']:.2f} | {r['tok_s_on_over_off']:.2f} | "
            f"{r['wall_off_over_on']:.2f} | {r['rows'][1]['hit_rate']:.2f} |"
        )
    m = res["median"]
    out.append(
        f"| median | **{m['ttft_p50_off_over_on']:.2f}** | **{m['tok_s_on_over_off']:.2f}** | "
        f"**{m['wall_off_over_on']:.2f}** | |"
    )
    return "\n".join(out)
