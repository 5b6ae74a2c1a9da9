"""Grammars (xgrammar) alone: specs compile or fail with a readable reason, a matcher's packed mask
unpacks to the tokens xgrammar itself allows, and matching ends once the JSON is complete."""

from __future__ import annotations

import json

import pytest
import torch

from language_server.engine.grammar import GrammarError, Grammars, schema_spec
from language_server.engine.sampler import unpack_bits

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def grammars(tiny_model_dir):
    from deepsplit.model.processor import Preprocessor

    pre = Preprocessor.from_dir(tiny_model_dir)
    return Grammars(pre.tokenizer, 151936), pre.tokenizer


def test_bad_specs_fail_with_the_schema_engine_reason(grammars):
    g, _ = grammars
    with pytest.raises(GrammarError, match='^Unsupported type "wat"'):
        g.compile(schema_spec({"type": "wat"}))
    with pytest.raises(GrammarError, match="unknown grammar spec"):
        g.compile("yaml")
    g.compile("json")
    g.compile(schema_spec(SCHEMA))


def test_the_mask_unpacks_to_what_xgrammar_allows(grammars):
    import xgrammar as xgr

    g, _ = grammars
    m = g.matcher(schema_spec(SCHEMA))
    words = m.allowed()
    logits = torch.zeros(1, 151936)
    xgr.apply_token_bitmask_inplace(logits, words[None].clone())
    assert torch.equal(unpack_bits(words, 151936), logits[0] == 0)
    assert 0 < int(unpack_bits(words, 151936).sum()) < 1000  # an object starts: few tokens fit


def test_walking_a_schema_by_its_most_likely_allowed_token_ends_in_valid_json(grammars):
    g, tok = grammars
    m = g.matcher(schema_spec(SCHEMA))
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(64):
        allowed = unpack_bits(m.allowed(), 151936)
        scores = torch.rand(151936, generator=gen).masked_fill(~allowed, -1)
        t = int(scores.argmax())
        assert m.accept(t)
        if m.ended:
            break
        out.append(t)
    assert m.ended and t == 151645  # the grammar's end allows only the stop token
    obj = json.loads(tok.decode(out))
    assert list(obj) == ["ok", "n"] and isinstance(obj["ok"], bool) and 0 <= obj["n"] <= 9
