"""The two MoE dispatches (padded bmm for few rows per expert, grouped GEMMs for many) agree."""

from __future__ import annotations

import pytest
import torch

from deepsplit.model.moe import SparseMoeBlock


def block(seed: int = 0) -> SparseMoeBlock:
    torch.manual_seed(seed)
    m = SparseMoeBlock(hidden=32, inter=24, num_experts=8, top_k=2)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return m.eval()


@pytest.mark.parametrize("T", [1, 3, 16, 200])
def test_padded_and_grouped_dispatch_agree(T):
    m = block()
    x = torch.randn(T, 32)
    with torch.inference_mode():
        w, e = m.route(x)
        flat = e.reshape(-1)
        counts = torch.bincount(flat, minlength=8).tolist()
        grouped = m._grouped(x, w, flat, counts)
        padded = m._padded(x, w, flat, max(counts))
        torch.testing.assert_close(padded, grouped, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(x), grouped, atol=1e-5, rtol=1e-5)
