"""Paged attention: one step mixing a fresh prompt, a prefill chunk and decodes of different lengths
(so the batched decode pads and masks, and its rows are not adjacent) equals plain causal attention
over each whole sequence."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepsplit.model.attention import AttentionMetadata, PagedKVCache, attention

NH, NKV, D, BS = 4, 2, 8, 4


# (cached, new) per sequence
MIXED = [(9, 1), (0, 5), (3, 1), (6, 7), (13, 1)]  # decode, prompt, shorter decode, prefill chunk, decode
DECODES = [(8, 1)] * 3  # adjacent rows, equal lengths: no mask


@pytest.mark.parametrize("shape", [MIXED, DECODES], ids=["mixed", "decodes"])
def test_step_equals_full_causal_attention(shape):
    torch.manual_seed(0)
    cache = PagedKVCache(1, 64, BS, NKV, D)
    free = iter(torch.randperm(64).tolist())  # scattered blocks
    tables = [[next(free) for _ in range((c + n + BS - 1) // BS)] for c, n in shape]
    full = [
        (torch.randn(c + n, NH, D), torch.randn(c + n, NKV, D), torch.randn(c + n, NKV, D)) for c, n in shape
    ]
    k_pool, v_pool = cache.layer(0)
    for (c, _), t, (_, k, v) in zip(shape, tables, full, strict=True):  # what earlier steps cached
        for p in range(c):
            k_pool[t[p // BS], p % BS], v_pool[t[p // BS], p % BS] = k[p], v[p]
    width = max(map(len, tables))
    slots = [
        t[p // BS] * BS + p % BS for (c, n), t in zip(shape, tables, strict=True) for p in range(c, c + n)
    ]
    meta = AttentionMetadata(
        [n for _, n in shape],
        [c for c, _ in shape],
        torch.tensor(slots),
        torch.tensor([t + [0] * (width - len(t)) for t in tables]),
    )
    q, k, v = (torch.cat([f[j][c:] for (c, _), f in zip(shape, full, strict=True)]) for j in range(3))
    with torch.inference_mode():
        out = attention(q, k, v, meta, cache.layer(0), D**-0.5)
    expect = []
    for (c, _), (fq, fk, fv) in zip(shape, full, strict=True):
        o = F.scaled_dot_product_attention(
            fq.transpose(0, 1), fk.transpose(0, 1), fv.transpose(0, 1), is_causal=True, enable_gqa=True
        )
        expect.append(o.transpose(0, 1)[c:].reshape(-1, NH * D))
    torch.testing.assert_close(out, torch.cat(expect), atol=1e-5, rtol=1e-5)


def test_length_groups_split_far_lengths_and_respect_the_cap():
    from deepsplit.model.attention import _length_groups

    assert _length_groups([10] * 4 + [1000] * 4, overhead=256, cap=10**9) == [(0, 4), (4, 8)]
    assert _length_groups([10, 11, 12], overhead=256, cap=10**9) == [(0, 3)]  # not worth a call
    runs = _length_groups([300] * 10, overhead=1, cap=1000)
    assert all((b - a) * 300 <= 1000 for a, b in runs) and runs[0][0] == 0 and runs[-1][1] == 10
