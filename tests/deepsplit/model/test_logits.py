"""`logits_and_argmax` (vocabulary in chunks, argmax fused) equals `compute_logits` and its argmax."""

from __future__ import annotations

import pytest
import torch

from deepsplit.model.layers import logits_and_argmax


@pytest.mark.parametrize("B", [1, 5, 64])
def test_equals_compute_logits(ours, B):
    lm = ours[0]
    h = torch.randn(B, lm.lm_head.weight.shape[1])
    buf = torch.empty(lm.lm_head.weight.shape[0] * B + 7)
    with torch.inference_mode():
        ref = lm.compute_logits(h)
        logits, best = lm.logits_and_argmax(h, buf)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(best, ref.argmax(-1))
        assert torch.equal(lm.logits_and_argmax(h)[1], best)  # without a buffer


def test_best_tokens_in_different_chunks():
    V, H = 50_000, 4
    W = torch.zeros(V, H)
    W[3, 0] = W[V - 1, 1] = W[30_000, 2] = 1.0
    W[7, 3] = W[40_000, 3] = 1.0  # a tie: the first id wins, as with argmax
    logits, best = logits_and_argmax(W, torch.eye(H))
    assert best.tolist() == [3, V - 1, 30_000, 7]
    assert torch.equal(logits, W.t())
