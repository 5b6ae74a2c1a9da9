"""A minimal greedy generator over the model code: vision + text in one process, one batch at a time.

This is the reference path the fidelity tests and `deepsplit generate` use; it is NOT the serving
engine (no scheduler, no continuous batching). It exercises the same pieces the engine does:
vision tower, M-RoPE, deepstack hook, paged KV cache, chunked prefill and batched decode.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deepsplit.model.attention import AttentionMetadata, PagedKVCache
from deepsplit.model.mrope import decode_positions, mrope_positions
from deepsplit.model.processor import PreparedPrompt


@dataclass
class PromptInputs:
    """What the language model needs for one prompt, wherever the vision rows were computed."""

    input_ids: torch.Tensor  # [N] long
    positions: torch.Tensor  # [3, N] long
    mrope_delta: int
    vision_embeds: torch.Tensor | None  # [V, H]
    deepstack: torch.Tensor | None  # [V, n_ds * H]


def encode_prompts(vision, cfg, prompts: list[PreparedPrompt]) -> list[PromptInputs]:
    """Run the vision tower once over the images of all prompts; build each prompt's inputs."""
    grids = [g for p in prompts for g in p.grid_thw]
    embeds = deepstack = None
    if grids:
        pixels = torch.cat([p.pixel_values for p in prompts if p.pixel_values is not None])
        with torch.no_grad():
            embeds, deepstack = vision(pixels, torch.tensor(grids))
    out, row = [], 0
    for p in prompts:
        pos, delta = mrope_positions(
            p.input_ids, cfg.image_token_id, p.grid_thw, cfg.vision.spatial_merge_size
        )
        n = sum(vision.rows_per_image(torch.tensor(p.grid_thw))) if p.grid_thw else 0
        ve = embeds[row : row + n] if n else None
        ds = deepstack[row : row + n] if n else None
        row += n
        out.append(PromptInputs(torch.tensor(p.input_ids), pos, delta, ve, ds))
    return out


@torch.no_grad()
def prefill_logits(lm, cfg, inputs: list[PromptInputs]) -> list[torch.Tensor]:
    """Full-prompt logits `[N_i, V]` of several prompts in ONE flattened forward, no cache."""
    ids, pos, emb, ds = _flatten(lm, cfg, inputs)
    hidden = lm(ids, pos, AttentionMetadata.no_cache([len(x.input_ids) for x in inputs]), None, emb, ds)
    return list(lm.compute_logits(hidden).split([len(x.input_ids) for x in inputs]))


def _flatten(lm, cfg, inputs: list[PromptInputs]):
    ids = torch.cat([x.input_ids for x in inputs])
    pos = torch.cat([x.positions for x in inputs], dim=1)
    mask = ids == cfg.image_token_id
    ve = [x.vision_embeds for x in inputs if x.vision_embeds is not None]
    if not ve:
        return ids, pos, None, None
    emb = lm.model.embed(ids, torch.cat(ve), mask)
    dsr = torch.cat([x.deepstack for x in inputs if x.deepstack is not None])
    ds = emb.new_zeros(len(ids), dsr.shape[1])
    ds[mask] = dsr.to(ds.dtype)
    return ids, pos, emb, ds


@torch.no_grad()
def greedy_generate(
    lm,
    cfg,
    inputs: list[PromptInputs],
    max_new_tokens: int,
    block_size: int = 16,
    prefill_chunk: int | None = None,
    stop_ids: tuple[int, ...] = (),
) -> list[list[int]]:
    """Greedy continuations of several prompts: (chunked) prefill, then batched decode, paged cache."""
    t = cfg.text
    lens = [len(x.input_ids) for x in inputs]
    per_seq = [(n + max_new_tokens + block_size - 1) // block_size for n in lens]
    cache = PagedKVCache(
        t.num_hidden_layers,
        sum(per_seq),
        block_size,
        t.num_key_value_heads,
        t.head_dim,
        dtype=lm.lm_head.weight.dtype,
    )
    tables, start = [], 0
    for n in per_seq:
        tables.append(list(range(start, start + n)))
        start += n
    table_t = torch.tensor([tb + [0] * (max(per_seq) - len(tb)) for tb in tables])
    out: list[list[int]] = [[] for _ in inputs]
    last_logits = []
    for i, x in enumerate(inputs):  # prefill each prompt, in chunks when asked
        ids, pos, emb, ds = _flatten(lm, cfg, [x])
        chunk = prefill_chunk or len(ids)
        for s in range(0, len(ids), chunk):
            e = min(s + chunk, len(ids))
            slots = _slots(tables[i], range(s, e), block_size)
            meta = AttentionMetadata([e - s], [s], slots, table_t[i : i + 1])
            hidden = lm(
                ids[s:e],
                pos[:, s:e],
                meta,
                cache,
                None if emb is None else emb[s:e],
                None if ds is None else ds[s:e],
            )
        last_logits.append(lm.compute_logits(hidden[-1:]))
    next_tok = [int(lg.argmax(-1)) for lg in last_logits]
    done = [False] * len(inputs)
    cur = list(lens)
    for _ in range(max_new_tokens):
        for i, tok in enumerate(next_tok):
            if not done[i]:
                out[i].append(tok)
                done[i] = tok in stop_ids or len(out[i]) >= max_new_tokens
        live = [i for i in range(len(inputs)) if not done[i]]
        if not live:
            break
        ids = torch.tensor([next_tok[i] for i in live])
        pos = decode_positions([cur[i] for i in live], [inputs[i].mrope_delta for i in live])
        slots = torch.cat([_slots(tables[i], [cur[i]], block_size) for i in live])
        meta = AttentionMetadata([1] * len(live), [cur[i] for i in live], slots, table_t[live])
        logits = lm.compute_logits(lm(ids, pos, meta, cache))
        for j, i in enumerate(live):
            next_tok[i] = int(logits[j].argmax())
            cur[i] += 1
    return out


def _slots(table: list[int], positions, block_size: int) -> torch.Tensor:
    return torch.tensor([table[p // block_size] * block_size + p % block_size for p in positions])
