"""`deepsplit bench model`: our model code against transformers on the same checkpoint, same process.

Prints parameter counts and file sizes of the checkpoint, then prefill time (one prompt of
`--prompt-len` tokens) and decode step time (`--batch` sequences with `--context` cached tokens)
for our code and for `Qwen3VLMoeForConditionalGeneration`, with ratios. Not a serving benchmark.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (e.g. the small preset)")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    parser.add_argument("--json", dest="json_out", help="write every figure to this file")


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import DynamicCache, Qwen3VLMoeForConditionalGeneration

    from deepsplit.model.attention import AttentionMetadata, PagedKVCache
    from deepsplit.model.build import load_language_model, load_vision_model

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model)
    lm, cfg = load_language_model(path)
    vm, _ = load_vision_model(path, cfg=cfg)
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32).eval()
    text_params = sum(p.numel() for p in lm.parameters())
    vision_params = sum(p.numel() for p in vm.parameters())
    file_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    t, V = cfg.text, cfg.text.vocab_size
    res: dict = {"text_params": text_params, "vision_params": vision_params, "weights_bytes": file_bytes}

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 150000, (args.prompt_len,), generator=gen)
    with torch.no_grad():
        meta = AttentionMetadata.no_cache([args.prompt_len])
        res["prefill_ours_s"] = _time(
            lambda: lm.compute_logits(lm(ids, torch.arange(args.prompt_len), meta)[-1:]), args.repeats
        )
        res["prefill_hf_s"] = _time(lambda: hf(input_ids=ids[None], logits_to_keep=1), args.repeats)

        B, C, bs = args.batch, args.context, 16
        nblk = (C + 1 + bs - 1) // bs
        cache = PagedKVCache(t.num_hidden_layers, B * nblk, bs, t.num_key_value_heads, t.head_dim)
        cache.data.normal_()
        tables = torch.arange(B * nblk).view(B, nblk)
        slots = tables[:, C // bs] * bs + C % bs
        step_ids = torch.randint(0, 150000, (B,), generator=gen)
        dmeta = AttentionMetadata([1] * B, [C] * B, slots, tables)
        pos = torch.full((3, B), C)
        res["decode_step_ours_s"] = _time(
            lambda: lm.compute_logits(lm(step_ids, pos, dmeta, cache)), args.repeats
        )

        kv = DynamicCache(config=hf.config.text_config)
        hf_ctx = torch.randint(0, 150000, (B, C), generator=gen)
        out = hf(input_ids=hf_ctx, past_key_values=kv, use_cache=True, logits_to_keep=1)
        kv = out.past_key_values

        def hf_step():  # one decode step, then drop the new token so every step sees C cached
            hf(input_ids=step_ids[:, None], past_key_values=kv, use_cache=True)
            kv.crop(-1)

        res["decode_step_hf_s"] = _time(hf_step, args.repeats)
    res.update(batch=B, context=C, prompt_len=args.prompt_len, vocab=V)
    print(
        f"checkpoint {path}: text {text_params / 1e6:.1f} M params, vision {vision_params / 1e6:.1f} M, "
        f"weights {file_bytes / 2**20:.0f} MiB"
    )
    print(f"{'':28}{'ours':>10}{'transformers':>14}{'ours/hf':>9}")
    for key, label in (
        ("prefill", f"prefill {args.prompt_len} tok"),
        ("decode_step", f"decode step B={B} ctx={C}"),
    ):
        o, h = res[f"{key}_ours_s"], res[f"{key}_hf_s"]
        print(f"{label:28}{o * 1e3:>8.1f}ms{h * 1e3:>12.1f}ms{o / h:>9.2f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=2))
    return 0
