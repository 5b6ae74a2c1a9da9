"""`encode-server`: serve the vision tower of a Qwen3-VL-MoE checkpoint for language servers."""

from __future__ import annotations

import argparse
import logging
import sys

from deepsplit.settings import SettingsError, add_field_flags, describe, load_settings
from encode_server.config import EncodeSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="encode-server",
        description="Encode server: runs only the vision tower and pushes image rows into language servers' "
        "buffers (Mooncake or ZMQ). Options not given here come from --config, then the environment "
        "(DEEPSPLIT_ENCODE_<OPTION>), then defaults; see configs/encode.yaml.",
    )
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--config", help="YAML settings file (e.g. configs/encode.yaml)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--max-batch-patches", type=int, help="patch budget of one batched vision forward")
    p.add_argument("--cache-bytes", type=int, help="embedding cache size in bytes (0 disables)")
    p.add_argument("--allow-http-images", action="store_true", default=None)
    p.add_argument("--transfer-host", help="address the transfer engine binds and advertises")
    p.add_argument("--mooncake-protocol", help="Mooncake transport: tcp | rdma")
    p.add_argument("--mooncake-device", help="RDMA device names for Mooncake (e.g. mlx5_0)")
    p.add_argument(
        "--register-with",
        type=lambda s: [u for u in s.split(",") if u],
        help="comma-separated language server URLs to announce this encoder to",
    )
    p.add_argument(
        "--advertise-url", help="URL language servers reach this encoder at (default http://host:port)"
    )
    p.add_argument("--log-level")
    add_field_flags(p, EncodeSettings)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        settings = load_settings(EncodeSettings, args.config, overrides, env_prefix="DEEPSPLIT_ENCODE_")
    except SettingsError as e:
        print(f"encode-server: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise
    logging.getLogger(__name__).info("encode-server settings:\n%s", describe(settings))
    import torch
    import uvicorn

    from encode_server.app import build_app

    if settings.threads:
        torch.set_num_threads(settings.threads)
    app = build_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
