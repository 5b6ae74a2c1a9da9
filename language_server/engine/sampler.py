"""Turns a batch of logits into next tokens, each row with its own sampling parameters.

Greedy rows take the argmax. Sampled rows are scaled by temperature, cut by top-k and top-p (one
sort for the whole batch, only when some row asks for it), then drawn with the exponential-race
trick (`argmax(p / q)`, q ~ Exp(1)) so that one call samples the batch while a seeded request
still draws its noise from its own `torch.Generator`. Knows nothing of sequences or the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RowParams:
    temperature: float
    top_p: float = 1.0
    top_k: int = 0
    generator: torch.Generator | None = None


def sample(
    logits: torch.Tensor | None, rows: list[RowParams], argmax: torch.Tensor | None = None
) -> list[int]:
    """logits: [B, V] float32 -> B token ids. With `argmax` [B] (every row's greedy token) given,
    `logits` holds only the rows with temperature > 0, in order (None if there are none)."""
    idx = [i for i, r in enumerate(rows) if r.temperature > 0]
    if argmax is None:
        out, x = logits.argmax(dim=-1), (logits[torch.tensor(idx)] if idx else None)
    else:
        out, x = argmax.clone(), logits  # [B]; [len(idx), V]
    if not idx:
        return out.tolist()
    sel = torch.tensor(idx)
    V = x.shape[-1]
    x = x / torch.tensor([rows[i].temperature for i in idx], dtype=x.dtype)[:, None]
    top_k = [rows[i].top_k if 0 < rows[i].top_k < V else V for i in idx]
    top_p = [rows[i].top_p for i in idx]
    if any(k < V for k in top_k) or any(p < 1.0 for p in top_p):
        x = _filter(x, torch.tensor(top_k), torch.tensor(top_p, dtype=x.dtype))
    probs = torch.softmax(x, dim=-1)  # [b, V]
    q = torch.empty_like(probs)
    unseeded = [j for j, i in enumerate(idx) if rows[i].generator is None]
    if unseeded:
        q[unseeded] = torch.empty(len(unseeded), V, dtype=probs.dtype).exponential_()
    for j, i in enumerate(idx):
        if rows[i].generator is not None:
            q[j].exponential_(generator=rows[i].generator)
    out[sel] = (probs / q).argmax(dim=-1)
    return out.tolist()


def _filter(x: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits outside each row's top-k and top-p nucleus to -inf. x: [b, V]."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    ranks = torch.arange(x.shape[-1])[None, :]
    drop = ranks >= top_k[:, None]
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(dim=-1)  # nucleus within the top-k
    before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
    drop |= before >= top_p[:, None]
    drop[:, 0] = False  # always keep the best token
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x)
