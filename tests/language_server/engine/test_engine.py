"""The engine in-process on the tiny checkpoint: greedy output equals transformers' generate (text and
images, chunked prefill, mixed batches), preemption under a small KV cache, stop conditions, seeds,
and the multimodal buffer callback."""

from __future__ import annotations

import itertools

import pytest
import torch

from language_server.engine.offline import generate
from language_server.engine.sequence import SamplingParams, Sequence
from language_server.mm.base import MultimodalInputs
from tests.language_server.conftest import image_message, make_image, start_engine

_ids = itertools.count()
PROMPTS = [
    "Tell me a story about a fox.",
    "Hi",
    "Explain continuous batching in one long paragraph, please, "
    "with several examples of schedulers, block tables and preemption policies." * 2,
    "1 2 3 4 5",
]


def text_ids(pre, text: str) -> list[int]:
    return pre.tokenizer(pre.render([{"role": "user", "content": text}]), add_special_tokens=False)[
        "input_ids"
    ]


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, **kw)


def run(built, prompts: list[list[int]], params: SamplingParams, mm=None):
    seqs = [Sequence(f"r{next(_ids)}", list(p), params) for p in prompts]
    mm_by_id = {s.id: x for s, x in zip(seqs, mm, strict=True) if x is not None} if mm else None
    res = generate(built.engine, seqs, mm_by_id, timeout=120)
    return [res[s.id] for s in seqs]


def oracle(hf, ids: list[int], n: int, **kw) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(input_ids=x, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    return out[0, len(ids) :].tolist()


def mm_inputs(vision, messages, images, released: list | None = None) -> MultimodalInputs:
    e = vision.encode(messages, images)
    cb = (lambda: released.append(1)) if released is not None else None
    return MultimodalInputs(e.fill_ids.long(), e.positions.long(), e.mrope_delta, e.embeds, e.deepstack, cb)


def test_text_greedy_equals_transformers(engine, hf_oracle):
    pre = engine.preprocessor
    prompts = [text_ids(pre, p) for p in PROMPTS]
    results = run(engine, prompts, greedy(12))  # all four in one continuous batch, long one chunked
    for ids, r in zip(prompts, results, strict=True):
        assert r.finish_reason == "length" and len(r.token_ids) == 12
        assert r.token_ids == oracle(hf_oracle, ids, 12)
        assert r.text == pre.decode(r.token_ids)


def test_image_greedy_equals_transformers_and_frees_the_buffer_once(engine, hf_oracle, vision):
    images = [make_image(160, 256, 1), make_image(224, 128, 2)]
    messages = image_message("Compare these two pictures.", ["x", "y"])
    released: list = []
    inputs = mm_inputs(vision, messages, images, released)
    budget = engine.engine.scheduler.budget
    assert (
        inputs.fill_ids[budget - 1 : budget + 1] == engine.cfg.image_token_id
    ).all()  # chunk splits an image
    p = vision.pre.prepare(messages, images)
    (r,) = run(engine, [[]], greedy(10), [inputs])
    ids = torch.tensor([p.input_ids])
    ref = oracle(
        hf_oracle,
        p.input_ids,
        10,
        pixel_values=p.pixel_values,
        image_grid_thw=torch.tensor(p.grid_thw),
        mm_token_type_ids=(ids == engine.cfg.image_token_id).int(),
    )
    assert r.token_ids == ref
    assert released == [1]


def test_mixed_text_and_image_batch_equals_solo(engine, vision):
    pre = engine.preprocessor
    prompts = [text_ids(pre, p) for p in PROMPTS]
    msgs = image_message("What is here?", ["x"])
    mk = lambda: mm_inputs(vision, msgs, [make_image(64, 64, 5)])  # noqa: E731
    solo = [run(engine, [p], greedy(8))[0].token_ids for p in prompts]
    solo_img = run(engine, [[]], greedy(8), [mk()])[0].token_ids
    together = run(engine, [*prompts, []], greedy(8), [None] * len(prompts) + [mk()])
    assert [r.token_ids for r in together] == [*solo, solo_img]


def test_preemption_under_a_small_kv_cache_keeps_outputs_exact(tiny_model_dir, engine):
    pre = engine.preprocessor
    prompts = [text_ids(pre, f"Sequence number {i} says: " + "la " * (3 * i)) for i in range(8)]
    solo = [run(engine, [p], greedy(24))[0].token_ids for p in prompts]
    small = start_engine(
        tiny_model_dir, kv_cache_bytes=12 * 2 * 4 * 2 * 32 * 4 * 8, block_size=8
    )  # 12 blocks
    try:
        assert small.engine.scheduler.blocks.num_blocks == 12
        results = run(small, prompts, greedy(24))
        assert [r.token_ids for r in results] == solo
        assert small.engine.scheduler.num_preemptions > 0
        assert small.engine.scheduler.blocks.num_free == 12
    finally:
        small.engine.stop()


def logprob_lists(result) -> tuple[list, list]:
    outs = result.outputs
    plps = [x for o in outs if o.prompt_logprobs is not None for x in o.prompt_logprobs]
    return [x.logprob for o in outs for x in o.logprobs], [(x.token, x.logprob) for x in plps]


def test_logprobs_and_prompt_logprobs_survive_preemption(tiny_model_dir, engine):
    """Each token's and each prompt token's log-probabilities come once, in order, and equal a solo
    run's when the sequences are preempted and recomputed under a small KV cache."""
    pre = engine.preprocessor
    prompts = [text_ids(pre, f"Sequence number {i} says: " + "la " * (3 * i)) for i in range(6)]
    params = greedy(20, logprobs=2, prompt_logprobs=1)
    solo = [run(engine, [p], params)[0] for p in prompts]
    for p, r in zip(prompts, solo, strict=True):
        lps, plps = logprob_lists(r)
        assert len(lps) == 20 and [t for t, _ in plps] == p[1:]
    small = start_engine(tiny_model_dir, kv_cache_bytes=12 * 2 * 4 * 2 * 32 * 4 * 8, block_size=8)
    try:
        results = run(small, prompts, params)
        assert small.engine.scheduler.num_preemptions > 0
        for got, want in zip(results, solo, strict=True):
            assert got.token_ids == want.token_ids
            (a, pa), (b, pb) = logprob_lists(got), logprob_lists(want)
            assert a == pytest.approx(b, abs=1e-4)
            assert [t for t, _ in pa] == [t for t, _ in pb]
            assert [v for _, v in pa] == pytest.approx([v for _, v in pb], abs=1e-4)
    finally:
        small.engine.stop()


def test_stop_token_ids_stop_strings_and_max_tokens(engine):
    pre = engine.preprocessor
    ids = text_ids(pre, PROMPTS[0])
    (ref,) = run(engine, [ids], greedy(12))
    (r,) = run(engine, [ids], greedy(12, stop_token_ids=(ref.token_ids[4],)))
    assert (
        r.finish_reason == "stop"
        and r.token_ids == ref.token_ids[: ref.token_ids.index(ref.token_ids[4]) + 1]
    )
    stop = ref.text[len(ref.text) // 2 : len(ref.text) // 2 + 3]
    (r,) = run(engine, [ids], greedy(12, stop=(stop,)))
    assert r.finish_reason == "stop" and r.text == ref.text[: ref.text.index(stop)]
    (r,) = run(engine, [ids], greedy(3))
    assert r.finish_reason == "length" and r.token_ids == ref.token_ids[:3]


def test_eos_ends_a_request(engine):
    eos = engine.cfg.eos_token_ids[0]
    pre = engine.preprocessor
    ids = text_ids(pre, PROMPTS[1])
    (ref,) = run(engine, [ids], greedy(6))
    engine.engine.eos_ids = frozenset({ref.token_ids[2], eos})  # pretend the 3rd token is EOS
    try:
        (r,) = run(engine, [ids], SamplingParams(max_tokens=6, temperature=0.0))
    finally:
        engine.engine.eos_ids = frozenset(engine.cfg.eos_token_ids)
    assert r.finish_reason == "stop" and r.token_ids == ref.token_ids[:3]


def test_seeded_sampling_is_reproducible_and_batch_independent(engine):
    pre = engine.preprocessor
    ids = text_ids(pre, PROMPTS[0])
    p = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=123, ignore_eos=True)
    (a,) = run(engine, [ids], p)
    b = run(engine, [ids, text_ids(pre, PROMPTS[2])], p)[0]
    assert a.token_ids == b.token_ids
    (c,) = run(engine, [ids], SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True))
    assert c.token_ids != a.token_ids


def test_prompt_that_cannot_fit_the_cache_fails_cleanly(tiny_model_dir):
    small = start_engine(tiny_model_dir, kv_cache_bytes=4 * 2 * 4 * 2 * 32 * 4 * 8, block_size=8)  # 4 blocks
    try:
        (r,) = run(small, [list(range(100, 140))], greedy(4))
        assert r.finish_reason == "error" and "does not fit" in r.error
        (r,) = run(small, [list(range(100, 110))], greedy(4))
        assert r.finish_reason == "length"
    finally:
        small.engine.stop()


def test_buffer_is_freed_on_abort_while_waiting_and_on_refusal(tiny_model_dir, engine, vision):
    msgs = image_message("What is here?", ["x"])
    released: list = []
    inputs = mm_inputs(vision, msgs, [make_image(64, 64, 9)], released)
    seq = Sequence(f"r{next(_ids)}", [], greedy(4))
    from language_server.engine.sequence import Status

    seq.status = Status.WAITING_FOR_EMBEDDINGS
    outs: list = []
    engine.engine.add(seq, outs.append)
    engine.engine.abort(seq.id)
    engine.engine.inputs_ready(seq.id, inputs)  # the rows arrive after the client left
    (r,) = run(engine, [text_ids(engine.preprocessor, "sync")], greedy(1))  # commands are handled in order
    assert r.finish_reason == "length"
    assert released == [1] and outs[-1].finished and outs[-1].finish_reason == "abort"

    small = start_engine(tiny_model_dir, kv_cache_bytes=2 * 2 * 4 * 2 * 32 * 4 * 8, block_size=8)  # 16 tokens
    try:
        refused: list = []
        (r,) = run(small, [[]], greedy(2), [mm_inputs(vision, msgs, [make_image(64, 64, 9)], refused)])
        assert r.finish_reason == "error" and refused == [1]
    finally:
        small.engine.stop()
