"""`deepsplit demo` (what `make run` does): start one encode and one language server, send one
image+text chat request with the openai client, print the answer and how to send more, keep serving
until Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import io
import sys

from deepsplit.cluster import Cluster, print_endpoints, serve_until_signal, settings_from_args
from deepsplit.cluster import add_arguments as add_cluster_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_cluster_arguments(parser)
    parser.add_argument("--prompt", default="What is in this picture?")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--no-wait", action="store_true", help="stop after the first answer")


def demo_image_url() -> str:
    """A small generated picture (a red disc on a blue gradient) as a data: URL."""
    import numpy as np
    from PIL import Image

    h, w = 96, 128
    y, x = np.mgrid[0:h, 0:w]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 2] = (x * 255 // w).astype(np.uint8)
    disc = (x - 64) ** 2 + (y - 48) ** 2 < 30**2
    img[disc] = (220, 30, 30)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run(args: argparse.Namespace) -> int:
    from openai import OpenAI

    settings = settings_from_args(args)
    log_dir = args.log_dir or ".logs"  # keep the servers' own output out of the demo's
    cluster = Cluster(settings, log_dir)
    print(
        f"deepsplit demo: starting {settings.encoders} encode server(s) and {settings.languages} language "
        f"server(s) on {settings.model} ({settings.backend} transfer) ...",
        flush=True,
    )
    cluster.start()
    base = cluster.endpoint + "/v1"
    try:
        client = OpenAI(base_url=base, api_key="unused")
        # the served name from a language server itself: a router may not know it (see deepsplit.router)
        model = OpenAI(base_url=cluster.language_urls[0] + "/v1", api_key="unused").models.list().data[0].id
        content = [
            {"type": "image_url", "image_url": {"url": demo_image_url()}},
            {"type": "text", "text": args.prompt},
        ]
        resp = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": content}],
            max_tokens=args.max_tokens,
            temperature=0,
        )
    except Exception as e:  # noqa: BLE001
        print(f"deepsplit demo: request failed: {e}", file=sys.stderr)
        cluster.stop()
        return 1
    print("\nready:")
    print_endpoints(cluster)
    print(f"  server logs      {log_dir}/")
    print(f"\nuser: [image] {args.prompt}")
    print(f"assistant: {resp.choices[0].message.content}")
    print(
        f"({resp.usage.prompt_tokens} prompt tokens, {resp.usage.completion_tokens} completion tokens; "
        "the tiny model has random weights, so the text is gibberish by design)\n"
    )
    print("send more:")
    print(
        f"  curl {base}/chat/completions -H 'Content-Type: application/json' \\\n"
        f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\''
    )
    print(
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='{base}', api_key='x'); "
        f"print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', 'content': 'Hi'}}])"
        '.choices[0].message.content)"'
    )
    if args.no_wait:
        cluster.stop()
        return 0
    print("\nserving until Ctrl-C ...", flush=True)
    return serve_until_signal(cluster)
