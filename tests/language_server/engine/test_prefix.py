"""Block content keys: a key stands for the whole prefix up to its block's end, image digests
included, and only full blocks get one."""

from __future__ import annotations

from language_server.engine.prefix import block_key, extend_keys
from language_server.engine.sequence import SamplingParams, Sequence


def keys(ids, extras=None, bs=4):
    s = Sequence("s", list(ids), SamplingParams(), block_extras=dict(extras or {}))
    return extend_keys(s, 100, bs)


def test_equal_prefixes_have_equal_keys_and_a_change_changes_every_later_key():
    base = keys(range(12))
    assert len(base) == 3 and len(set(base)) == 3
    assert keys(range(12)) == base
    assert keys([*range(12), 99, 98]) == base  # the partial fourth block has no key
    changed = keys([0, 1, 2, 3, 4, 99, 6, 7, 8, 9, 10, 11])
    assert changed[0] == base[0] and changed[1] != base[1] and changed[2] != base[2]


def test_an_image_digest_separates_blocks_with_the_same_token_ids():
    base = keys(range(12))
    img = keys(range(12), {1: b"image-a"})
    other = keys(range(12), {1: b"image-b"})
    assert img[0] == base[0] and img[1] != base[1] and img[2] != base[2]
    assert other[0] == img[0] and other[1] != img[1] and other[2] != img[2]


def test_keys_grow_with_the_output_and_match_a_prompt_holding_the_same_tokens():
    s = Sequence("s", list(range(6)), SamplingParams())
    assert len(extend_keys(s, 100, 4)) == 1
    s.output_ids += [6, 7, 8]
    assert extend_keys(s, 100, 4) == keys(range(9))[:2]
    assert extend_keys(s, 1, 4) == s.block_keys[:2]  # never shrinks


def test_block_key_depends_on_parent_tokens_and_extra():
    k = block_key(b"", [1, 2])
    assert k != block_key(b"p", [1, 2]) and k != block_key(b"", [1, 3]) and k != block_key(b"", [1, 2], b"x")
    assert len(k) == 16
