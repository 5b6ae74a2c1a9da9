"""The `deepsplit` command: one entry point whose subcommands live in their own modules.

Each subcommand is a module exposing `add_arguments(parser)` and `run(args) -> int`; modules are
imported only when their subcommand runs, so `deepsplit --help` stays fast and optional
dependencies stay optional.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "tiny-model": ("deepsplit.checkpoint.cli", "write a deterministic random Qwen3-VL-MoE checkpoint"),
    "generate": ("deepsplit.generate_cli", "run one greedy generation through the model code (no servers)"),
    "bench": ("deepsplit.bench.cli", "benchmarks: transfer, serve"),
    "up": ("deepsplit.cluster", "start a local cluster of encode and language servers"),
    "demo": ("deepsplit.demo", "start a local cluster, send one image+text chat request, keep serving"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="deepsplit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.print_help()
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    cmd_parser = argparse.ArgumentParser(prog=f"deepsplit {argv[0]}", description=COMMANDS[argv[0]][1])
    module.add_arguments(cmd_parser)
    args = cmd_parser.parse_args(argv[1:])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
