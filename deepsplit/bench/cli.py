"""`deepsplit bench NAME ...`: dispatches to one benchmark module per name."""

from __future__ import annotations

import argparse
import importlib

BENCHES = {
    "transfer": "deepsplit.bench.transfer",
    "serve": "deepsplit.bench.serve",
    "model": "deepsplit.bench.model",
    "serve-images": "deepsplit.bench.serve_images",
    "prefix": "deepsplit.bench.prefix",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BENCHES))
    parser.add_argument(
        "rest", nargs=argparse.REMAINDER, help="arguments of that benchmark (see NAME --help)"
    )


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(BENCHES[args.name])
    parser = argparse.ArgumentParser(prog=f"deepsplit bench {args.name}")
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.rest)) or 0)
