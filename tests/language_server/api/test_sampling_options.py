"""logprobs / top_logprobs, repetition / frequency / presence penalties, logit_bias, echo and the
echoed prompt's logprobs (what evaluation harnesses score with),
through the real server and the real `openai` client, against transformers on the same checkpoint
(its own repetition penalty, and its raw logits with OpenAI's penalty formula applied by hand)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0}
MESSAGES = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture(scope="module")
def pre(tiny_model_dir):
    from deepsplit.model.processor import Preprocessor

    return Preprocessor.from_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def chat_ids(pre) -> list[int]:
    return pre.tokenizer(pre.render(MESSAGES), add_special_tokens=False)["input_ids"]


def hf_greedy(hf, ids: list[int], n: int, adjust=None) -> tuple[list[int], list[torch.Tensor]]:
    """n greedy tokens from transformers, one full forward per step: (tokens, the raw log-softmax of
    each step's logits); `adjust(logits, generated)` changes the logits the argmax sees."""
    seq, out, lps = list(ids), [], []
    with torch.no_grad():
        for _ in range(n):
            logits = hf(input_ids=torch.tensor([seq])).logits[0, -1].float()
            lps.append(torch.log_softmax(logits, -1))
            if adjust is not None:
                logits = adjust(logits.clone(), out)
            out.append(int(logits.argmax()))
            seq.append(out[-1])
    return out, lps


def chat(client, n: int, **kw):
    extra = kw.pop("extra_body", {})
    return client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=n,
        extra_body={"ignore_eos": True, **extra},
        **GREEDY,
        **kw,
    )


def test_chat_logprobs_equal_transformers(client, hf_oracle, pre, chat_ids):
    r = chat(client, 6, logprobs=True, top_logprobs=3)
    toks, lps = hf_greedy(hf_oracle, chat_ids, 6)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    for tok, lp, e in zip(toks, lps, content, strict=True):
        assert e.token == pre.tokenizer.decode([tok])
        assert e.logprob == pytest.approx(lp[tok].item(), abs=1e-3)
        best = lp.topk(3)
        assert [t.token for t in e.top_logprobs] == [pre.tokenizer.decode([i]) for i in best.indices.tolist()]
        assert [t.logprob for t in e.top_logprobs] == pytest.approx(best.values.tolist(), abs=1e-3)
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob >= e.top_logprobs[2].logprob
    text = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert text == r.choices[0].message.content  # the tokens' exact bytes make up the answer

    plain = chat(client, 6)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == text
    only = chat(client, 6, logprobs=True)  # no alternatives asked
    assert [e.top_logprobs for e in only.choices[0].logprobs.content] == [[]] * 6
    assert [e.logprob for e in only.choices[0].logprobs.content] == [e.logprob for e in content]


def test_chat_stream_carries_the_same_logprobs(client):
    full = chat(client, 8, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    chunks = list(chat(client, 8, logprobs=True, top_logprobs=2, stream=True))
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [(e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in streamed] == [
        (e.token, e.logprob, [t.token for t in e.top_logprobs]) for e in full
    ]


def test_completion_logprobs_legacy_shape_stream_and_echo(client, hf_oracle, pre):
    prompt = "The quick brown fox"
    ids = pre.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    kw = dict(model="tiny", prompt=prompt, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    r = client.completions.create(**kw, logprobs=2)
    toks, lps = hf_greedy(hf_oracle, ids, 5)
    lp = r.choices[0].logprobs
    assert lp.tokens == [pre.tokenizer.decode([t]) for t in toks]
    assert lp.token_logprobs == pytest.approx([s[t].item() for s, t in zip(lps, toks, strict=True)], abs=1e-3)
    for step, (s, t) in enumerate(zip(lps, toks, strict=True)):
        best = {pre.tokenizer.decode([i]) for i in s.topk(2).indices.tolist()}
        assert set(lp.top_logprobs[step]) == best | {pre.tokenizer.decode([t])}  # "up to logprobs + 1"
    assert lp.text_offset == [sum(len(x) for x in lp.tokens[:i]) for i in range(5)]

    stream = list(client.completions.create(**kw, logprobs=2, stream=True))
    parts = [c.choices[0].logprobs for c in stream if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == lp.tokens
    assert [o for p in parts for o in p.text_offset] == lp.text_offset
    assert [v for p in parts for v in p.token_logprobs] == lp.token_logprobs

    echoed = client.completions.create(**kw, echo=True)
    assert echoed.choices[0].text == prompt + r.choices[0].text
    echoed_stream = list(client.completions.create(**kw, echo=True, stream=True))
    assert "".join(c.choices[0].text for c in echoed_stream if c.choices) == echoed.choices[0].text


def test_repetition_penalty_equals_transformers(client, hf_oracle, pre, chat_ids):
    with torch.no_grad():
        out = hf_oracle.generate(
            input_ids=torch.tensor([chat_ids]),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            repetition_penalty=1.8,
        )
    ref = pre.decode(out[0, len(chat_ids) :].tolist())
    got = chat(client, 16, extra_body={"repetition_penalty": 1.8}).choices[0].message.content
    assert got == ref
    assert got != chat(client, 16).choices[0].message.content  # the penalty did change the answer


def test_frequency_and_presence_penalties_follow_openai(client, hf_oracle, pre, chat_ids):
    def openai_penalties(logits: torch.Tensor, out: list[int]) -> torch.Tensor:
        for t in set(out):
            logits[t] -= 0.9 * out.count(t) + 1.5
        return logits

    toks, _ = hf_greedy(hf_oracle, chat_ids, 16, openai_penalties)
    got = chat(client, 16, frequency_penalty=0.9, presence_penalty=1.5).choices[0].message.content
    assert got == pre.decode(toks)
    plain, _ = hf_greedy(hf_oracle, chat_ids, 16)
    assert toks != plain  # the penalties did change the answer


def test_logit_bias_moves_and_forces_tokens(client, hf_oracle, pre, chat_ids):
    plain, lps = hf_greedy(hf_oracle, chat_ids, 1)
    banned = plain[0]
    r = chat(client, 4, logit_bias={str(banned): -100}, logprobs=True)
    ref, _ = hf_greedy(
        hf_oracle, chat_ids, 4, lambda x, _: x.index_put_((torch.tensor([banned]),), x[banned] - 100)
    )
    assert r.choices[0].message.content == pre.decode(ref) and banned not in ref
    # logprobs are the model's own (before the bias): the first token's is its unbiased logprob
    assert r.choices[0].logprobs.content[0].logprob == pytest.approx(lps[0][ref[0]].item(), abs=1e-3)
    forced = pre.tokenizer("ocean", add_special_tokens=False)["input_ids"][0]
    sampled = client.chat.completions.create(
        model="tiny",
        messages=MESSAGES,
        max_tokens=5,
        temperature=1.0,
        seed=3,
        logit_bias={str(forced): 100},
        extra_body={"ignore_eos": True},
    )
    assert sampled.choices[0].message.content == pre.decode([forced] * 5)


def test_echo_scores_the_prompt_like_transformers(client, hf_oracle, pre):
    """max_tokens 0 + echo + logprobs: the prompt's own log-probabilities, each token given the ones
    before it; the prompt is longer than the server's 256-token step, so it is scored in two chunks."""
    prompt = "A river runs to the sea, and the sea is never full. " * 24
    ids = pre.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert 256 < len(ids) < 500
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=2)
    with torch.no_grad():
        ref = torch.log_softmax(hf_oracle(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == prompt and r.usage.completion_tokens == 0
    assert lp.tokens == [pre.tokenizer.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = ref[:-1].gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1).tolist()
    assert lp.token_logprobs[1:] == pytest.approx(want, abs=1e-3)
    for i in (1, 200, len(ids) - 1):  # the two best after tokens [0, i), and the token itself
        best = {pre.tokenizer.decode([t]) for t in ref[i - 1].topk(2).indices.tolist()}
        assert set(lp.top_logprobs[i]) == best | {lp.tokens[i]}

    kw = dict(model="tiny", prompt=prompt, max_tokens=3, echo=True, logprobs=2, temperature=0)
    full = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0]
    assert full.logprobs.token_logprobs[: len(ids)] == lp.token_logprobs  # then the 3 generated ones
    assert len(full.logprobs.tokens) == len(ids) + 3 and full.text.startswith(prompt)
    chunks = [
        c.choices[0] for c in client.completions.create(**kw, stream=True, extra_body={"ignore_eos": True})
    ]
    first = chunks[0].logprobs
    assert chunks[0].text == prompt and first.token_logprobs == lp.token_logprobs
    streamed = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    assert streamed == full.logprobs.tokens and "".join(c.text for c in chunks) == full.text


def test_min_tokens_keeps_eos_away_until_reached(client, pre):
    """EOS made certain by logit_bias: without min_tokens the answer ends at once, with it the first
    4 tokens are something else and the fifth is EOS again."""
    eos = pre.tokenizer.convert_tokens_to_ids("<|im_end|>")
    kw = dict(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0, logit_bias={str(eos): 100})
    r = client.chat.completions.create(**kw, logprobs=True)
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    r = client.chat.completions.create(**kw, logprobs=True, extra_body={"min_tokens": 4})
    toks = [e.token for e in r.choices[0].logprobs.content]
    assert r.choices[0].finish_reason == "stop" and len(toks) == 5 and "<|im_end|>" not in toks[:4]
    assert toks[4] == "<|im_end|>"
