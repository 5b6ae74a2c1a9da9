"""Incremental detokenizer: stable text, stop strings cut and never leaked in a delta."""

from __future__ import annotations

from language_server.engine.detokenizer import Detokenizer


class CharTokenizer:
    """id -> one character; 0 decodes to half a character unless followed by 1 (a split emoji)."""

    def decode(self, ids, skip_special_tokens=True):
        out, i = [], 0
        while i < len(ids):
            if ids[i] == 0:
                out.append("é" if i + 1 < len(ids) and ids[i + 1] == 1 else "\ufffd")
                i += 2 if i + 1 < len(ids) and ids[i + 1] == 1 else 1
            else:
                out.append(chr(ids[i]))
                i += 1
        return "".join(out)


def feed(d: Detokenizer, text: str):
    deltas, hit = [], False
    for ch in text:
        delta, hit = d.add(ord(ch))
        deltas.append(delta)
        if hit:
            break
    return deltas, hit


def test_no_stop_strings_streams_everything():
    d = Detokenizer(CharTokenizer())
    deltas, hit = feed(d, "hello")
    assert "".join(deltas) == "hello" and not hit and d.flush() == ""


def test_stop_string_ends_the_text_before_it_and_is_never_emitted():
    d = Detokenizer(CharTokenizer(), ("STOP",))
    deltas, hit = feed(d, "abcSTOPxyz")
    assert hit and "".join(deltas) == "abc" and d.text == "abc"


def test_partial_stop_prefix_is_held_back_then_released():
    d = Detokenizer(CharTokenizer(), ("STOP",))
    deltas, hit = feed(d, "abSTOx")
    assert not hit and "".join(deltas) + d.flush() == "abSTOx"
    assert "STO" not in "".join(deltas[:5])


def test_incomplete_characters_wait_for_their_second_token():
    d = Detokenizer(CharTokenizer())
    assert d.add(0) == ("", False)
    assert d.add(1) == ("é", False)
    assert d.add(ord("!")) == ("!", False)


def test_a_stop_string_within_the_first_min_tokens_does_not_stop():
    d = Detokenizer(CharTokenizer(), ("ab",), min_tokens=4)
    deltas, hit = feed(d, "abxabyy")
    assert hit and "".join(deltas) == "abx"  # the first "ab" ended at token 2 < 4, the second counts
    d = Detokenizer(CharTokenizer(), ("ab",), min_tokens=4)
    deltas, hit = feed(d, "xxaby")  # one that starts before and ends at token 4 counts
    assert hit and "".join(deltas) == "xx"
