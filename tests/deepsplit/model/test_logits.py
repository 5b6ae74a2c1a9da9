"""The sampling logits: vocabulary in chunks with the argmax fused, dense and oneDNN-packed, equal
`compute_logits` and its argmax."""

from __future__ import annotations

import pytest
import torch

from deepsplit.model import packed
from deepsplit.model.build import load_language_model
from deepsplit.model.layers import logits_and_argmax


@pytest.fixture(scope="module")
def packed_lm(tiny_model_dir):
    if not packed.available():
        pytest.skip("oneDNN unavailable")
    return load_language_model(tiny_model_dir)[0].pack_weights()


@pytest.mark.parametrize("B", [1, 5, 64])
def test_dense_chunks_equal_compute_logits(ours, B):
    W = ours[0].lm_head.weight
    h = torch.randn(B, W.shape[1])
    buf = torch.empty(W.shape[0] * B + 7)
    with torch.inference_mode():
        ref = ours[0].compute_logits(h)
        logits, best = logits_and_argmax(W, h, buf)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)
        assert torch.equal(best, ref.argmax(-1))
        assert torch.equal(logits_and_argmax(W, h)[1], best)  # without a buffer


@pytest.mark.parametrize("rows", [[], [1, 3], [0, 1, 2, 3, 4]])
def test_sample_logits_dense_and_packed(ours, packed_lm, rows):
    h = torch.randn(5, ours[0].lm_head.weight.shape[1])
    with torch.inference_mode():
        ref = ours[0].compute_logits(h)
        for lm in (ours[0], packed_lm):
            best, logits = lm.sample_logits(h, rows)
            assert torch.equal(best, ref.argmax(-1))
            if rows:
                torch.testing.assert_close(logits, ref[rows], atol=1e-5, rtol=1e-5)
            else:
                assert logits is None


def test_best_tokens_in_different_chunks():
    V, H = 50_000, 4
    W = torch.zeros(V, H)
    W[3, 0] = W[V - 1, 1] = W[30_000, 2] = 1.0
    W[7, 3] = W[40_000, 3] = 1.0  # a tie: the first id wins, as with argmax
    logits, best = logits_and_argmax(W, torch.eye(H))
    assert best.tolist() == [3, V - 1, 30_000, 7]
    assert torch.equal(logits, W.t())
