"""Prefix caching on the tiny checkpoint: a request that reuses cached K/V (text, images, a chat's
next turn, several at once, after eviction) gives the tokens and log-probabilities an engine without
the cache gives (and transformers' greedy tokens), and says how many prompt tokens it reused."""

from __future__ import annotations

import pytest

from language_server.engine.sequence import SamplingParams
from tests.language_server.conftest import image_message, make_image, start_engine
from tests.language_server.engine.test_engine import greedy, mm_inputs, oracle, run, text_ids

BS = 8


@pytest.fixture(scope="module")
def cached(tiny_model_dir):
    built = start_engine(tiny_model_dir, max_num_batched_tokens=64, block_size=BS)
    assert built.engine.scheduler.blocks.caching
    yield built
    built.engine.stop()


@pytest.fixture(scope="module")
def plain(tiny_model_dir):
    built = start_engine(
        tiny_model_dir, max_num_batched_tokens=64, block_size=BS, enable_prefix_caching=False
    )
    yield built
    built.engine.stop()


def cached_tokens(result) -> int:
    return result.outputs[-1].cached_tokens


def logprobs(result) -> list[float]:
    return [x.logprob for o in result.outputs for x in o.logprobs]


def same(got, want) -> None:
    assert got.token_ids == want.token_ids
    assert logprobs(got) == pytest.approx(logprobs(want), abs=1e-4)


def test_a_repeated_prompt_reuses_its_blocks_and_answers_the_same(cached, plain, hf_oracle):
    ids = text_ids(cached.preprocessor, "A fox, a hound and a hare walk into a long story " * 4)
    params = greedy(10, logprobs=1)
    first, again = run(cached, [ids], params)[0], run(cached, [ids], params)[0]
    want = run(plain, [ids], params)[0]
    assert cached_tokens(first) == 0 and cached_tokens(again) == (len(ids) - 1) // BS * BS
    same(first, want)
    same(again, want)
    assert again.token_ids == oracle(hf_oracle, ids, 10)
    longer = ids + text_ids(cached.preprocessor, "and then?")  # shares the first prompt's blocks
    got = run(cached, [longer], params)[0]
    assert cached_tokens(got) == len(ids) // BS * BS
    same(got, run(plain, [longer], params)[0])


def test_requests_submitted_together_share_one_prefill(cached, plain):
    ids = text_ids(cached.preprocessor, "Four friends ask the same question at the same moment. " * 3)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0)
    results = run(cached, [ids] * 4, params)
    want = run(plain, [ids], params)[0]
    assert [cached_tokens(r) for r in results] == [0] + [(len(ids) - 1) // BS * BS] * 3
    for r in results:
        same(r, want)


def test_the_next_turn_of_a_chat_reuses_the_answer_it_generated(cached, plain):
    pre = cached.preprocessor
    ids = text_ids(pre, "Say something long about rivers.")
    first = run(cached, [ids], greedy(24))[0]
    follow = ids + first.token_ids + text_ids(pre, "More.")
    got = run(cached, [follow], greedy(6, logprobs=0))[0]
    assert cached_tokens(got) == (len(ids) + len(first.token_ids)) // BS * BS > len(ids) // BS * BS
    same(got, run(plain, [follow], greedy(6, logprobs=0))[0])


def test_the_same_image_reuses_its_blocks_and_another_image_does_not(cached, plain, vision):
    msgs = image_message("What is in the picture, in detail?", ["x"])
    img, other = make_image(128, 160, 11), make_image(128, 160, 12)  # same size: same token ids
    params = greedy(8, logprobs=0)
    first = run(cached, [[]], params, [mm_inputs(vision, msgs, [img])])[0]
    again = run(cached, [[]], params, [mm_inputs(vision, msgs, [img])])[0]
    diff = run(cached, [[]], params, [mm_inputs(vision, msgs, [other])])[0]
    inputs = mm_inputs(vision, msgs, [img])
    n = inputs.fill_ids.numel()
    first_pad = int((inputs.fill_ids == cached.engine.runner.cfg.image_token_id).nonzero()[0])
    assert cached_tokens(first) < first_pad + BS  # at most the text before the picture, if cached earlier
    assert cached_tokens(again) == (n - 1) // BS * BS
    assert cached_tokens(diff) == first_pad // BS * BS  # the blocks before its first pad only
    same(first, run(plain, [[]], params, [mm_inputs(vision, msgs, [img])])[0])
    same(again, first)
    same(diff, run(plain, [[]], params, [mm_inputs(vision, msgs, [other])])[0])
    assert diff.token_ids != first.token_ids or logprobs(diff) != pytest.approx(logprobs(first), abs=1e-4)


def test_prompt_logprobs_are_computed_even_when_the_prompt_is_cached(cached, plain):
    ids = text_ids(cached.preprocessor, "Score every token of this sentence, please.")
    run(cached, [ids], greedy(2))
    params = greedy(2, prompt_logprobs=0)
    got, want = run(cached, [ids], params)[0], run(plain, [ids], params)[0]
    assert cached_tokens(got) == 0
    plp = lambda r: [x.logprob for x in r.outputs[0].prompt_logprobs]  # noqa: E731
    assert len(plp(got)) == len(ids) - 1 and plp(got) == pytest.approx(plp(want), abs=1e-4)


def test_a_small_cache_evicts_and_recomputes_without_changing_answers(tiny_model_dir, plain):
    pre = plain.preprocessor
    shared = "You are a helpful assistant who answers in full sentences. "
    prompts = [text_ids(pre, shared + f"Question {i}: " + "why " * (2 * i)) for i in range(8)]
    want = [run(plain, [p], greedy(16))[0].token_ids for p in prompts]
    small = start_engine(tiny_model_dir, kv_cache_bytes=12 * 2 * 4 * 2 * 32 * 4 * BS, block_size=BS)
    try:
        blocks = small.engine.scheduler.blocks
        assert blocks.num_blocks == 12 and blocks.caching
        for _ in range(2):  # the second round finds some of the first round's blocks, not all
            got = run(small, prompts, greedy(16))
            assert [r.token_ids for r in got] == want
        s = small.engine.stats()
        assert 0 < s["prefix_cache_hit_tokens"] < s["prefix_cache_queried_tokens"]
        assert blocks.num_free == 12 and s["kv_blocks_used"] == 0
    finally:
        small.engine.stop()
