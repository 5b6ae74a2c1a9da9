"""Several choices in one request, through the real server and the real `openai` client: chat's `n`
(greedy choices agree, seeded ones differ and repeat), completions with several prompts (token ids
or text) times `n`, streams tagged by choice index, usage counting each prompt once, and a stream
of several choices given up freeing every choice's KV blocks."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.language_server.api.conftest import API_KEY

pytestmark = pytest.mark.slow
MESSAGES = [{"role": "user", "content": "Name a colour."}]


def ask(client, **kw):
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    return client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=6, extra_body=extra, **kw
    )


def test_chat_n_greedy_agree_seeded_differ_and_repeat(client):
    one = ask(client, temperature=0)
    three = ask(client, temperature=0, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert {c.message.content for c in three.choices} == {one.choices[0].message.content}
    assert three.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert three.usage.completion_tokens == 18

    a = ask(client, temperature=1.0, seed=7, n=3)
    b = ask(client, temperature=1.0, seed=7, n=3)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) == 3  # each choice draws its own noise
    assert ask(client, temperature=1.0, seed=7).choices[0].message.content == texts[0]


def test_chat_n_stream_is_tagged_by_index(client):
    full = ask(client, temperature=1.0, seed=11, n=3, logprobs=True)
    chunks = list(
        ask(
            client,
            temperature=1.0,
            seed=11,
            n=3,
            logprobs=True,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    texts, roles, finishes, lps = {}, {}, {}, {}
    for c in chunks[:-1]:
        (ch,) = c.choices
        texts[ch.index] = texts.get(ch.index, "") + (ch.delta.content or "")
        if ch.delta.role:
            roles[ch.index] = ch.delta.role
        if ch.finish_reason:
            finishes.setdefault(ch.index, []).append(ch.finish_reason)
        if ch.logprobs:
            lps.setdefault(ch.index, []).extend(e.logprob for e in ch.logprobs.content)
    assert texts == {c.index: c.message.content for c in full.choices}
    assert roles == dict.fromkeys(range(3), "assistant") and finishes == dict.fromkeys(range(3), ["length"])
    assert lps == {c.index: [e.logprob for e in c.logprobs.content] for c in full.choices}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 18


def test_completions_with_several_prompts_times_n(client, tiny_model_dir):
    from deepsplit.model.processor import Preprocessor

    pre = Preprocessor.from_dir(tiny_model_dir)
    prompts = ["The sea is", "Mountains are tall and"]
    kw = dict(model="tiny", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    solo = [client.completions.create(prompt=p, **kw).choices[0].text for p in prompts]
    r = client.completions.create(prompt=prompts, n=2, **kw)
    assert [(c.index, c.text) for c in r.choices] == [(0, solo[0]), (1, solo[0]), (2, solo[1]), (3, solo[1])]
    lens = [len(pre.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (sum(lens), 20)

    ids = [pre.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    by_ids = client.completions.create(prompt=ids, echo=True, **kw)
    assert [c.text for c in by_ids.choices] == [
        pre.tokenizer.decode(i) + s for i, s in zip(ids, solo, strict=True)
    ]
    stream = list(client.completions.create(prompt=prompts, stream=True, **kw))
    got = {}
    for c in stream:
        for ch in c.choices:
            got[ch.index] = got.get(ch.index, "") + ch.text
    assert got == {0: solo[0], 1: solo[1]}


def test_a_stream_of_several_choices_given_up_frees_them_all(server):
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "n": 4,
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers=headers, timeout=60
    ) as r:
        indices, held = set(), 0.0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                indices.update(c["index"] for c in json.loads(line[6:])["choices"])
            if len(indices) == 4 and server.metric("deepsplit_language_running") == 4:
                held = server.metric("deepsplit_language_kv_blocks_used")
                break  # all four are generating; leaving the loop closes the stream
    assert held >= 4  # a block each at least
    deadline = time.monotonic() + 20
    while server.metric("deepsplit_language_kv_blocks_used") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.metric("deepsplit_language_kv_blocks_used") == 0
    assert server.metric("deepsplit_language_running") == 0
