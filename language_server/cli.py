"""`language-server`: serve the MoE language model of a Qwen3-VL-MoE checkpoint over an OpenAI API.

Options not given as flags come from --config (YAML, see configs/language.yaml), then the
environment (DEEPSPLIT_LANGUAGE_<OPTION>), then defaults. It only parses and starts; `server.py`
assembles the pieces.
"""

from __future__ import annotations

import argparse
import logging
import sys

from deepsplit.settings import SettingsError, add_field_flags, describe, load_settings
from language_server.config import LanguageSettings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="language-server",
        description="Language server: continuous-batching MoE language model with an OpenAI-compatible "
        "API (/v1/chat/completions, /v1/completions, /v1/models, /health, /ready, /metrics). Images are "
        "encoded in-process (--mode monolithic) or by encode servers (--mode disaggregated). Options not "
        "given here come from --config, then DEEPSPLIT_LANGUAGE_<OPTION>, then defaults; see "
        "configs/language.yaml for every option.",
    )
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--config", help="YAML settings file (e.g. configs/language.yaml)")
    p.add_argument("--host")
    p.add_argument("--port", type=int, help="HTTP port (0: pick a free one)")
    p.add_argument("--api-key", help="require Authorization: Bearer <key> on /v1/*")
    p.add_argument("--served-model-name", help="model name clients use (default: checkpoint dir name)")
    p.add_argument("--mode", choices=["monolithic", "disaggregated"])
    p.add_argument(
        "--encoder-urls",
        type=lambda s: [u for u in s.split(",") if u],
        help="comma-separated encode server URLs (disaggregated mode)",
    )
    p.add_argument(
        "--encoder-dns",
        type=lambda s: [u for u in s.split(",") if u],
        help="comma-separated host:port names resolved periodically to encoders (e.g. a headless Service)",
    )
    p.add_argument(
        "--allow-encoder-registration",
        action="store_true",
        default=None,
        help="let encoders register themselves (POST /v1/encoders/register)",
    )
    p.add_argument("--transfer-backend", choices=["mooncake", "zmq"], help="how encoders push rows here")
    p.add_argument("--transfer-host", help="address encoders reach this node's receive buffers at")
    p.add_argument("--transfer-port", type=int, help="ZMQ control/data port of the receive buffers (0: free)")
    p.add_argument("--mooncake-protocol", help="Mooncake transport: tcp | rdma")
    p.add_argument("--mooncake-device", help="RDMA device names for Mooncake (e.g. mlx5_0)")
    p.add_argument("--mm-buffer-bytes", type=int, help="receive pool size for vision rows, bytes")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, help="torch intra-op threads (0: torch default)")
    p.add_argument("--kv-cache-bytes", type=int, help="memory for the paged KV cache")
    p.add_argument("--block-size", type=int, help="tokens per KV block")
    p.add_argument("--max-model-len", type=int, help="prompt + output token limit")
    p.add_argument("--max-num-seqs", type=int, help="sequences running at once")
    p.add_argument("--max-num-batched-tokens", type=int, help="token budget of one engine step")
    p.add_argument("--max-waiting-requests", type=int, help="queued requests beyond this get 429")
    p.add_argument("--allow-http-images", action="store_true", default=None, help="fetch http(s) image URLs")
    p.add_argument("--debug-endpoints", action="store_true", default=None, help="expose GET /debug/engine")
    p.add_argument("--log-level")
    add_field_flags(p, LanguageSettings)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        settings = load_settings(LanguageSettings, args.config, overrides, env_prefix="DEEPSPLIT_LANGUAGE_")
    except SettingsError as e:
        print(f"language-server: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per health probe otherwise
    logging.getLogger(__name__).info("language-server settings:\n%s", describe(settings))
    from language_server.server import LanguageServer

    try:
        server = LanguageServer.build(settings)
    except Exception as e:  # noqa: BLE001 - a start-up failure is reported, not a traceback dump
        logging.getLogger(__name__).exception("start-up failed")
        print(f"language-server: {e}", file=sys.stderr)
        return 1
    server.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
