"""`deepsplit tiny-model`: write a deterministic random Qwen3-VL-MoE checkpoint for tests or benchmarks."""

from __future__ import annotations

import argparse

from deepsplit.checkpoint.presets import PRESETS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="directory to write the checkpoint into")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    from deepsplit.checkpoint.builder import write_checkpoint

    out = write_checkpoint(args.out, args.preset, args.seed)
    print(f"wrote {args.preset} checkpoint (seed {args.seed}) to {out}")
    return 0
