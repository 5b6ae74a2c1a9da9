"""Batched sampler: greedy rows, top-k/top-p support, per-request seeds, temperature, penalties,
logit bias, and the log-probabilities of the chosen tokens."""

from __future__ import annotations

import pytest
import torch

from language_server.engine.sampler import RowParams, logit_rows, sample, token_logprobs


def logits(b: int = 4, v: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed))


def test_greedy_rows_take_the_argmax():
    x = logits()
    assert sample(x, [RowParams(0.0)] * 4) == x.argmax(-1).tolist()


def test_top_k_one_and_tiny_top_p_are_greedy_even_when_hot():
    x = logits()
    rows = [
        RowParams(5.0, top_k=1),
        RowParams(5.0, top_p=1e-6),
        RowParams(5.0, top_k=1),
        RowParams(5.0, top_p=1e-6),
    ]
    for _ in range(5):
        assert sample(x, rows) == x.argmax(-1).tolist()


def test_samples_stay_inside_top_k():
    x = logits(1, 100)
    allowed = set(x[0].topk(3).indices.tolist())
    seen = {sample(x, [RowParams(10.0, top_k=3)])[0] for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_samples_stay_inside_the_nucleus():
    x = torch.tensor([[4.0, 3.9, 0.0, -1.0, -2.0, -3.0]])  # p ~ [.50, .45, .02, ...]
    seen = {sample(x, [RowParams(1.0, top_p=0.9)])[0] for _ in range(300)}
    assert seen == {0, 1}


def test_same_seed_same_draws_independent_of_batch_neighbours():
    x = logits(3, 1000)
    g1, g2 = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    run1 = [sample(x, [RowParams(1.0, generator=g1), RowParams(0.0), RowParams(0.7)])[0] for _ in range(20)]
    run2 = [sample(x[:1], [RowParams(1.0, generator=g2)])[0] for _ in range(20)]
    assert run1 == run2
    assert len(set(run1)) > 1  # it does sample


def test_sampling_follows_the_distribution():
    x = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    g = torch.Generator().manual_seed(1)
    draws = [sample(x, [RowParams(1.0, generator=g)])[0] for _ in range(2000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert abs(freq[0] - 0.7) < 0.05 and abs(freq[1] - 0.2) < 0.05 and abs(freq[2] - 0.1) < 0.04


def test_repetition_penalty_equals_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    x = logits(1, 64, seed=3) * 3
    prompt, out = [1, 5, 9, 5], [9, 20, 33]
    ref = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + out]), x.clone())
    row = RowParams(0.0, repetition_penalty=1.7, prompt_ids=prompt, output_ids=out)
    assert sample(x, [row]) == ref.argmax(-1).tolist()
    from language_server.engine.sampler import _adjust

    assert torch.equal(_adjust(x, [row]), ref)


def test_frequency_presence_and_bias_adjust_a_copy_by_openais_formula():
    from language_server.engine.sampler import _adjust

    x = logits(2, 30, seed=4)
    keep = x.clone()
    rows = [
        RowParams(0.0, frequency_penalty=0.5, presence_penalty=0.25, output_ids=[3, 3, 7]),
        RowParams(1.0, logit_bias=((2, 10.0), (4, -1.5))),
    ]
    y = _adjust(x, rows)
    want = keep.clone()
    want[0, 3] -= 2 * 0.5 + 0.25
    want[0, 7] -= 0.5 + 0.25
    want[1, 2] += 10.0
    want[1, 4] -= 1.5
    assert torch.allclose(y, want) and torch.equal(x, keep)  # the caller's logits stay the model's


def test_a_mixed_batch_given_argmaxes_and_only_the_rows_that_need_logits():
    """The runner's path: every row's argmax, logits only for `logit_rows` (in order)."""
    x = logits(5, 40, seed=5)
    banned = int(x[3].argmax())
    rows = [
        RowParams(0.0),  # plain greedy: its argmax decides, no logits
        RowParams(0.0, logprobs=3),
        RowParams(0.0),
        RowParams(0.0, logit_bias=((banned, -100.0),), logprobs=0),
        RowParams(1.0, top_k=1),
    ]
    need = logit_rows(rows)
    assert need == [1, 3, 4]
    toks = sample(x[need], rows, x.argmax(-1))
    second = int(x[3].topk(2).indices[1])
    assert toks == [int(x[0].argmax()), int(x[1].argmax()), int(x[2].argmax()), second, int(x[4].argmax())]
    lps = token_logprobs(x[need], rows, toks)
    assert lps[0] is None and lps[2] is None and lps[4] is None
    ref = torch.log_softmax(x, -1)
    assert lps[1].token == toks[1] and lps[1].logprob == pytest.approx(ref[1, toks[1]].item())
    assert [t for t, _ in lps[1].top] == ref[1].topk(3).indices.tolist()
    assert [v for _, v in lps[1].top] == pytest.approx(ref[1].topk(3).values.tolist())
    assert lps[3].top == () and lps[3].logprob == pytest.approx(ref[3, second].item())  # before the bias
    every = token_logprobs(x, rows, toks, all_rows=True)  # logits of every row given
    assert every[1] == lps[1]
