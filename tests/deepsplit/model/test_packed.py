"""The oneDNN-packed serving path computes the same model as the dense one (prefill and paged decode)."""

from __future__ import annotations

import pytest
import torch

from deepsplit.model import packed
from deepsplit.model.attention import AttentionMetadata, PagedKVCache
from deepsplit.model.build import load_language_model
from deepsplit.model.moe import SparseMoeBlock

pytestmark = pytest.mark.skipif(not packed.available(), reason="oneDNN unavailable")


def test_linear_equals_dense():
    w, x = torch.randn(48, 32), torch.randn(7, 32)
    torch.testing.assert_close(packed.linear(x, packed.pack(w)), x @ w.t(), atol=1e-5, rtol=1e-5)


def test_packed_model_equals_dense(tiny_model_dir):
    dense = load_language_model(tiny_model_dir)[0]
    fast = load_language_model(tiny_model_dir)[0].pack_weights()
    assert all(m._packed is not None for m in fast.modules() if isinstance(m, SparseMoeBlock))
    t = dense.cfg
    ids = torch.randint(0, 1000, (2, 24))
    outs = []
    with torch.inference_mode():
        for lm in (dense, fast):
            cache = PagedKVCache(t.num_hidden_layers, 16, 8, t.num_key_value_heads, t.head_dim)
            tables = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
            slots = torch.cat([torch.arange(0, 23), torch.arange(32, 55)])
            prefill = lm(
                ids[:, :23].reshape(-1),
                torch.arange(23).repeat(2),
                AttentionMetadata([23, 23], [0, 0], slots, tables),
                cache,
            )
            decode = lm(
                ids[:, 23],
                torch.tensor([23, 23]),
                AttentionMetadata([1, 1], [23, 23], torch.tensor([23, 55]), tables),
                cache,
            )
            outs.append((prefill, decode))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
