"""`deepsplit generate`: one greedy generation through the model code, no servers (a smoke test)."""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--prompt", default="Describe this image in one sentence.")
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable)")
    parser.add_argument("--demo-image", action="store_true", help="use a generated test image")
    parser.add_argument("--max-tokens", type=int, default=24)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from deepsplit.model.build import load_language_model, load_vision_model
    from deepsplit.model.generate import encode_prompts, greedy_generate
    from deepsplit.model.processor import Preprocessor

    t0 = time.perf_counter()
    lm, cfg = load_language_model(args.model)
    vm, _ = load_vision_model(args.model, cfg=cfg)
    pre = Preprocessor.from_dir(args.model)
    images = [Image.open(p).convert("RGB") for p in args.image]
    if args.demo_image:
        grad = np.linspace(0, 255, 96, dtype=np.uint8)
        images.append(Image.fromarray(np.stack([np.tile(grad, (64, 1))] * 3, axis=-1)))
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": args.prompt}]
    prepared = pre.prepare([{"role": "user", "content": content}], images)
    t1 = time.perf_counter()
    (tokens,) = greedy_generate(
        lm, cfg, encode_prompts(vm, cfg, [prepared]), args.max_tokens, stop_ids=cfg.eos_token_ids
    )
    t2 = time.perf_counter()
    print(f"prompt: {len(prepared.input_ids)} tokens, {len(images)} image(s)")
    print(f"answer: {pre.decode(tokens)!r}")
    print(f"load {t1 - t0:.2f}s, generate {len(tokens)} tokens in {t2 - t1:.2f}s")
    return 0
