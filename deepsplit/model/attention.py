"""Causal self-attention over flattened tokens of many sequences, with an optional paged KV cache.

A step's tokens are laid out sequence after sequence (`[T, ...]`). `AttentionMetadata` says how
many new tokens each sequence has and how many it already cached; the runner builds it, this
module only reads it. Single-token decodes are attended by the native paged kernel
(`deepsplit.native`, straight from the cache blocks) where it loads, else in a few padded SDPA calls
(sequences grouped by length); prefill chunks one call per sequence. Without a cache each sequence
attends to its own new tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from deepsplit import native


@dataclass
class AttentionMetadata:
    query_lens: list[int]  # new tokens per sequence in this step
    context_lens: list[int]  # tokens already in the cache per sequence (0 for a fresh prompt)
    slot_mapping: torch.Tensor | None = None  # [T] long: flat cache slot of each new token
    block_tables: torch.Tensor | None = None  # [B, max_blocks] long, padded with 0
    native: bool | None = None  # decode with the native kernel: None where it loads and fits, True insist

    @classmethod
    def no_cache(cls, query_lens: list[int]) -> AttentionMetadata:
        return cls(list(query_lens), [0] * len(query_lens))

    def __post_init__(self) -> None:
        self.num_seqs = len(self.query_lens)
        self.total_lens = [q + c for q, c in zip(self.query_lens, self.context_lens, strict=False)]
        self.starts = _starts(self.query_lens)  # first step row of each sequence
        # decode sequences come last in a step when the runner orders them so; we do not rely on it
        self.decode_idx = [i for i, q in enumerate(self.query_lens) if q == 1 and self.context_lens[i] > 0]
        self._decode: list[_DecodePlan] | None = None
        self._decode_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def decode_index(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sequence, step row, keys incl. the new one) of each decode sequence, [n] long each: what the
        native kernel reads; built once per step."""
        if self._decode_index is None:
            idx = self.decode_idx
            rows = [self.starts[i] for i in idx]
            lens = [self.total_lens[i] for i in idx]
            self._decode_index = (torch.tensor(idx), torch.tensor(rows), torch.tensor(lens))
        return self._decode_index

    def decode_plans(self, k_cache: torch.Tensor) -> list[_DecodePlan]:
        """What every layer needs to attend the decode sequences, one plan per group of similar
        lengths (see DECODE_GROUP_BYTES); built once per step. k_cache: [blocks, bs, nkv, d]."""
        if self._decode is None:
            _, bs, nkv, d = k_cache.shape
            cap = DECODE_GROUP_BYTES // (2 * nkv * d * k_cache.element_size())  # keys per group
            lens = [self.total_lens[i] for i in self.decode_idx]
            order = sorted(range(len(lens)), key=lens.__getitem__)
            groups = _length_groups([lens[j] for j in order], DECODE_GROUP_OVERHEAD_KEYS, cap)
            self._decode = [
                _DecodePlan.build(self, [self.decode_idx[j] for j in order[a:b]], bs) for a, b in groups
            ]
        return self._decode


@dataclass
class _DecodePlan:
    rows: torch.Tensor | slice  # step rows of the decode queries (a slice when they are adjacent)
    blocks: torch.Tensor  # [B * nblk] long: cache blocks to read, sequence after sequence
    num_blocks: int  # nblk: blocks per sequence after padding to the longest
    length: int  # L: keys per sequence after padding
    mask: torch.Tensor | None  # [B, 1, 1, L] bool, None when every sequence has L keys

    @classmethod
    def build(cls, meta: AttentionMetadata, idx: list[int], bs: int) -> _DecodePlan:
        lens = [meta.total_lens[i] for i in idx]
        length = max(lens)
        nblk = (length + bs - 1) // bs
        rows_l = [meta.starts[i] for i in idx]
        adjacent = rows_l == list(range(rows_l[0], rows_l[0] + len(rows_l)))
        rows = slice(rows_l[0], rows_l[0] + len(rows_l)) if adjacent else torch.tensor(rows_l)
        tables = meta.block_tables if idx == list(range(meta.num_seqs)) else meta.block_tables[idx]
        blocks = tables[:, :nblk].reshape(-1)
        mask = None
        if min(lens) < length:
            mask = (torch.arange(length)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
        return cls(rows, blocks, nblk, length, mask)


# Decode sequences attend in groups of similar length, one gather + SDPA per group: padding to a
# group's longest wastes less than to the batch's longest, and a group's gathered K/V (at most
# DECODE_GROUP_BYTES) is still in cache when SDPA reads it — 4-5x faster than one call for 32
# sequences x 256 keys (16 MB). A group costs about DECODE_GROUP_OVERHEAD_KEYS keys of launches.
DECODE_GROUP_OVERHEAD_KEYS = 256
DECODE_GROUP_BYTES = 4 << 20


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
        k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
        v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)
    out = q.new_empty(T, nh, d)
    decode = meta.decode_idx if cache is not None else []
    if decode and _native_decode(meta, q, cache[0]):
        seqs, rows, lens = meta.decode_index()
        torch.ops.deepsplit.paged_decode_attention(
            q.contiguous(), *cache, meta.block_tables, seqs, rows, lens, scale, out
        )
    elif decode:
        for plan in meta.decode_plans(cache[0]):
            _batched_decode(q, out, plan, cache, scale)
    skip = set(decode)
    for i, qlen in enumerate(meta.query_lens if len(decode) < meta.num_seqs else []):
        if i in skip or qlen == 0:
            continue
        s = meta.starts[i]
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


def _native_decode(meta: AttentionMetadata, q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    if meta.native is not None:
        return meta.native
    return (
        q.dtype == k_cache.dtype == torch.float32 and q.shape[-1] in (16, 32, 64, 128, 256) and native.load()
    )


def _length_groups(lens: list[int], overhead: int, cap: int) -> list[tuple[int, int]]:
    """Split ascending `lens` into runs [a, b) minimising sum((b - a) * lens[b - 1] + overhead):
    the keys read when each run is padded to its longest, plus a per-call cost in keys; a run of
    more than one sequence holds at most `cap` padded keys."""
    n = len(lens)
    best, cut = [0] + [float("inf")] * n, [0] * (n + 1)
    for b in range(1, n + 1):
        for a in range(b - 1, -1, -1):
            keys = (b - a) * lens[b - 1]
            if keys > cap and a < b - 1:
                break
            c = best[a] + keys + overhead
            if c < best[b]:
                best[b], cut[b] = c, a
    runs, b = [], n
    while b:
        runs.append((cut[b], b))
        b = cut[b]
    return runs[::-1]


def _starts(lens: list[int]) -> list[int]:
    starts, acc = [], 0
    for n in lens:
        starts.append(acc)
        acc += n
    return starts


def _blocks(pool: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Rows of `pool` [num_blocks, bs, nkv, d] at `blocks` [n] -> [n * bs, nkv, d] (one memcpy per block)."""
    nb, bs, nkv, d = pool.shape
    return pool.view(nb, -1).index_select(0, blocks).view(-1, nkv, d)


def _gather(cache: tuple[torch.Tensor, torch.Tensor], table: torch.Tensor, length: int):
    """K, V of one sequence as [nkv, length, d]."""
    k_cache, v_cache = cache
    blocks = table[: (length + k_cache.shape[1] - 1) // k_cache.shape[1]]
    k, v = _blocks(k_cache, blocks)[:length], _blocks(v_cache, blocks)[:length]
    return k.transpose(0, 1), v.transpose(0, 1)


def _batched_decode(q, out, plan: _DecodePlan, cache, scale) -> None:
    """One SDPA call for all single-token decode sequences: keys padded to the longest, masked."""
    k_cache, v_cache = cache
    B, L, nkv, d = plan.blocks.numel() // plan.num_blocks, plan.length, k_cache.shape[2], q.shape[-1]
    k = _blocks(k_cache, plan.blocks).view(B, -1, nkv, d)[:, :L].transpose(1, 2)  # [B, nkv, L, d]
    v = _blocks(v_cache, plan.blocks).view(B, -1, nkv, d)[:, :L].transpose(1, 2)
    # the query heads sharing a KV head become that head's queries: [B, nkv, rep, d] (no K/V copies)
    qb = q[plan.rows].view(B, nkv, -1, d)
    o = F.scaled_dot_product_attention(qb, k, v, attn_mask=plan.mask, scale=scale)
    out[plan.rows] = o.reshape(B, -1, d)
