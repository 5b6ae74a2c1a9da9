"""Causal self-attention over flattened tokens of many sequences, with an optional paged KV cache.

A step's tokens are laid out sequence after sequence (`[T, ...]`). `AttentionMetadata` says how
many new tokens each sequence has and how many it already cached; the runner builds it, this
module only reads it. Decode-only sequences are attended in one batched call; prefill chunks one
call per sequence. Without a cache each sequence attends to its own new tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    query_lens: list[int]  # new tokens per sequence in this step
    context_lens: list[int]  # tokens already in the cache per sequence (0 for a fresh prompt)
    slot_mapping: torch.Tensor | None = None  # [T] long: flat cache slot of each new token
    block_tables: torch.Tensor | None = None  # [B, max_blocks] long, padded with 0

    @classmethod
    def no_cache(cls, query_lens: list[int]) -> AttentionMetadata:
        return cls(list(query_lens), [0] * len(query_lens))

    def __post_init__(self) -> None:
        self.num_seqs = len(self.query_lens)
        self.total_lens = [q + c for q, c in zip(self.query_lens, self.context_lens, strict=False)]
        # decode sequences come last in a step when the runner orders them so; we do not rely on it
        self.decode_idx = [i for i, q in enumerate(self.query_lens) if q == 1 and self.context_lens[i] > 0]


class PagedKVCache:
    """Per-layer K and V pools of shape `[num_blocks, block_size, n_kv_heads, head_dim]`."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        shape = (num_layers, 2, num_blocks, block_size, n_kv_heads, head_dim)
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks, self.block_size = num_blocks, block_size

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return (
            num_layers * 2 * block_size * n_kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()
        )

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[idx, 0], self.data[idx, 1]


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    cache: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
) -> torch.Tensor:
    """q: [T, nh, d]; k, v: [T, nkv, d] (new tokens) -> [T, nh * d]."""
    T, nh, d = q.shape
    if cache is not None:
        k_cache, v_cache = cache
        slots = meta.slot_mapping
        k_cache.view(-1, *k.shape[1:])[slots] = k
        v_cache.view(-1, *v.shape[1:])[slots] = v
    out = q.new_empty(T, nh, d)
    starts = _starts(meta.query_lens)
    decode = set(meta.decode_idx) if cache is not None else set()
    if decode:
        _batched_decode(q, out, meta, cache, starts, sorted(decode), scale)
    for i, qlen in enumerate(meta.query_lens):
        if i in decode or qlen == 0:
            continue
        s = starts[i]
        qi = q[s : s + qlen].transpose(0, 1)[None]  # [1, nh, q, d]: 4-D inputs take the fused CPU kernel
        ctx = meta.context_lens[i]
        if cache is None or ctx == 0:
            ki, vi = k[s : s + qlen].transpose(0, 1)[None], v[s : s + qlen].transpose(0, 1)[None]
        else:
            ki, vi = _gather(cache, meta.block_tables[i], ctx + qlen)
            ki, vi = ki[None], vi[None]
        if ctx == 0:
            o = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=scale, enable_gqa=True)
        else:  # chunk of a longer prompt: query j sees keys 0 .. ctx + j
            mask = torch.arange(ctx + qlen)[None, :] <= (ctx + torch.arange(qlen))[:, None]
            o = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=scale, enable_gqa=True)
        out[s : s + qlen] = o[0].transpose(0, 1)
    return out.reshape(T, nh * d)


def _starts(lens: list[int]) -> list[int]:
    starts, acc = [], 0
    for n in lens:
        starts.append(acc)
        acc += n
    return starts


def _gather(cache: tuple[torch.Tensor, torch.Tensor], table: torch.Tensor, length: int):
    """K, V of one sequence as [nkv, length, d]."""
    k_cache, v_cache = cache
    bs = k_cache.shape[1]
    blocks = table[: (length + bs - 1) // bs]
    k = k_cache[blocks].flatten(0, 1)[:length]
    v = v_cache[blocks].flatten(0, 1)[:length]
    return k.transpose(0, 1), v.transpose(0, 1)


def _batched_decode(q, out, meta, cache, starts, idx, scale) -> None:
    """One SDPA call for all single-token decode sequences: keys padded to the longest, masked."""
    k_cache, v_cache = cache
    bs = k_cache.shape[1]
    lens = torch.tensor([meta.total_lens[i] for i in idx])
    max_len = int(lens.max())
    nblk = (max_len + bs - 1) // bs
    tables = meta.block_tables[idx, :nblk]  # [B, nblk]
    k = k_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2)  # [B, nkv, L, d]
    v = v_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
    rows = torch.tensor([starts[i] for i in idx])
    nkv = k.shape[1]
    # the query heads sharing a KV head become that head's queries: [B, nkv, rep, d] (no K/V copies)
    qb = q[rows].view(len(idx), nkv, -1, q.shape[-1])
    mask = (torch.arange(max_len)[None, :] < lens[:, None])[:, None, None, :]  # [B, 1, 1, L]
    o = F.scaled_dot_product_attention(qb, k, v, attn_mask=mask, scale=scale)
    out[rows] = o.reshape(len(idx), -1, q.shape[-1])
