"""Structured output through the engine on the tiny checkpoint: every answer parses and fits its
schema (greedy, sampled, beside plain rows, under preemption), ends when the JSON does even with
ignore_eos, and a grammar row leaves the other rows of its batch as they were."""

from __future__ import annotations

import json

from language_server.engine.grammar import schema_spec
from language_server.engine.offline import generate
from language_server.engine.sequence import SamplingParams, Sequence
from tests.language_server.conftest import start_engine
from tests.language_server.engine.test_engine import PROMPTS, greedy, run, text_ids

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
SPEC = schema_spec(SCHEMA)


def fits(text: str) -> dict:
    obj = json.loads(text)
    assert list(obj) == ["name", "age", "tags"], obj
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 12
    assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 120
    assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and set(obj["tags"]) <= {"a", "b"}
    return obj


def test_answers_fit_the_schema_and_end_with_it(engine):
    ids = text_ids(engine.preprocessor, "Describe a person as JSON.")
    eos = set(engine.cfg.eos_token_ids)
    sampled = [
        SamplingParams(max_tokens=80, temperature=1.0, seed=s, grammar=SPEC, ignore_eos=True)
        for s in range(4)
    ]
    for params in [greedy(80, grammar=SPEC), *sampled]:
        r = run(engine, [ids], params)[0]
        assert r.finish_reason == "stop", (r.finish_reason, r.text)
        fits(r.text)
        assert r.token_ids[-1] in eos and not eos & set(r.token_ids[:-1])
    any_object = run(engine, [ids], greedy(40, grammar="json"))[0]
    assert any_object.finish_reason == "stop" and isinstance(json.loads(any_object.text), dict)


def test_a_grammar_row_leaves_its_batch_neighbours_unchanged(engine):
    pre = engine.preprocessor
    prompts = [text_ids(pre, p) for p in PROMPTS]
    solo = [run(engine, [p], greedy(10))[0].token_ids for p in prompts]
    structured = run(engine, [prompts[0]], greedy(80, grammar=SPEC))[0]
    mixed = [Sequence(f"mix{i}", list(p), greedy(10)) for i, p in enumerate(prompts)]
    mixed.append(Sequence("mix-json", list(prompts[0]), greedy(80, grammar=SPEC)))
    res = generate(engine.engine, mixed, timeout=120)
    assert [res[s.id].token_ids for s in mixed[:-1]] == solo
    assert res["mix-json"].token_ids == structured.token_ids


def test_structured_answers_survive_preemption(tiny_model_dir, engine):
    pre = engine.preprocessor
    prompts = [text_ids(pre, f"Person number {i}: " + "la " * (3 * i)) for i in range(6)]
    solo = [run(engine, [p], greedy(80, grammar=SPEC))[0] for p in prompts]
    small = start_engine(tiny_model_dir, kv_cache_bytes=12 * 2 * 4 * 2 * 32 * 4 * 8, block_size=8)
    try:
        got = run(small, prompts, greedy(80, grammar=SPEC))
        assert small.engine.scheduler.num_preemptions > 0
        assert [r.token_ids for r in got] == [r.token_ids for r in solo]
        for r in got:
            fits(r.text)
    finally:
        small.engine.stop()
