"""The real server process through the real `openai` client: chat (streaming or not), completions,
models, greedy equality with transformers (text and image), 32 concurrent requests, health/metrics."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from tests.language_server.api.conftest import API_KEY
from tests.language_server.conftest import data_url, image_message, make_image

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def pre(tiny_model_dir):
    from deepsplit.model.processor import Preprocessor

    return Preprocessor.from_dir(tiny_model_dir)


def oracle_text(hf, pre, ids: list[int], n: int, **kw) -> str:
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw
        )
    return pre.decode(out[0, len(ids) :].tolist())


def test_models_health_ready(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.get(server.url + "/ready")
    assert r.status_code == 200 and r.json()["ready"] is True


def test_model_retrieve_tokenize_detokenize(server, client, pre):
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    messages = [{"role": "user", "content": "Name three rivers."}]
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "messages": messages}, headers=auth)
    ids = pre.tokenizer(pre.render(messages), add_special_tokens=False)["input_ids"]
    assert r.json() == {"tokens": ids, "count": len(ids), "max_model_len": 512}
    used = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1).usage.prompt_tokens
    assert used == len(ids)  # what a request of those messages counts
    r = httpx.post(server.url + "/tokenize", json={"model": "tiny", "prompt": "a b c"}, headers=auth)
    back = httpx.post(
        server.url + "/detokenize", json={"model": "tiny", "tokens": r.json()["tokens"]}, headers=auth
    )
    assert back.json() == {"prompt": "a b c"}
    for body in ({"model": "tiny"}, {"model": "tiny", "prompt": "x", "messages": messages}):
        assert httpx.post(server.url + "/tokenize", json=body, headers=auth).status_code == 400
    bad = httpx.post(server.url + "/detokenize", json={"model": "tiny", "tokens": [-1]}, headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_chat_greedy_equals_transformers_and_reports_usage(client, hf_oracle, pre):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three rivers."}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, **GREEDY)
    ids = pre.tokenizer(pre.render(messages), add_special_tokens=False)["input_ids"]
    assert r.choices[0].message.content == oracle_text(hf_oracle, pre, ids, 12)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        len(ids),
        12,
        len(ids) + 12,
    )


def test_chat_stream_matches_non_stream_with_usage_chunk(client):
    kw = dict(
        model="tiny", messages=[{"role": "user", "content": "Count to five."}], max_completion_tokens=10
    )
    full = client.chat.completions.create(**kw, **GREEDY).choices[0].message.content
    chunks = list(
        client.chat.completions.create(**kw, **GREEDY, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_completions_plain_and_streaming(client, hf_oracle, pre):
    prompt = "The quick brown fox"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, **GREEDY)
    ids = pre.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert r.choices[0].text == oracle_text(hf_oracle, pre, ids, 8)
    assert r.usage.completion_tokens == 8 and r.object == "text_completion"
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, stream=True, **GREEDY)
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text
    default = client.completions.create(model="tiny", prompt=prompt, **GREEDY)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_image_chat_equals_transformers(client, hf_oracle, pre):
    imgs = [make_image(96, 128, 3), make_image(64, 64, 4)]
    urls = [data_url(imgs[0], "PNG"), data_url(imgs[1], "JPEG")]
    messages = image_message("What differs between these?", urls)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, **GREEDY)
    import base64
    import io

    from PIL import Image

    decoded = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB") for u in urls]
    p = pre.prepare(messages, decoded)
    ids = torch.tensor([p.input_ids])
    ref = oracle_text(
        hf_oracle,
        pre,
        p.input_ids,
        10,
        pixel_values=p.pixel_values,
        image_grid_thw=torch.tensor(p.grid_thw),
        mm_token_type_ids=(ids == pre.image_token_id).int(),
    )
    assert r.choices[0].message.content == ref
    assert r.usage.prompt_tokens == len(p.input_ids)


def test_32_concurrent_requests_each_equal_their_solo_output(server, client):
    def ask(i: int) -> str:
        if i % 8 == 7:  # a few image requests among the text ones
            msgs = image_message(f"Picture {i}?", [data_url(make_image(64, 96, i))])
        else:
            msgs = [{"role": "user", "content": f"Request {i}: " + "tell me more " * (i % 5)}]
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=8 + i % 9, **GREEDY)
        return r.choices[0].message.content

    solo = [ask(i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        together = list(pool.map(ask, range(32)))
    assert together == solo
    assert server.metric("deepsplit_language_kv_blocks_used") == 0


def test_seeded_sampling_is_reproducible(client):
    kw = dict(
        model="tiny",
        messages=[{"role": "user", "content": "Say something."}],
        max_tokens=12,
        temperature=1.0,
        top_p=0.9,
        seed=5,
        extra_body={"ignore_eos": True, "top_k": 50},
    )
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_metrics_count_requests_tokens_and_latencies(server, client):
    before = server.metric("deepsplit_language_generation_tokens_total")
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5, **GREEDY
    )
    assert server.metric("deepsplit_language_generation_tokens_total") == before + 5
    assert server.metric("deepsplit_language_time_to_first_token_seconds_count") >= 1
    assert server.metric("deepsplit_language_time_per_output_token_seconds_count") >= 1
    assert server.metric("deepsplit_language_kv_blocks_total") > 0
    text = httpx.get(server.url + "/metrics").text
    assert 'deepsplit_language_requests_total{endpoint="chat",status="length"}' in text
    assert "deepsplit_language_mm_buffer_blocks_used" in text and "deepsplit_language_waiting " in text


def test_a_repeated_prompt_reports_its_cached_tokens_in_usage_and_metrics(server, client, pre):
    messages = [{"role": "user", "content": "Describe a lighthouse at night, in a few words. " * 3}]
    ids = pre.tokenizer(pre.render(messages), add_special_tokens=False)["input_ids"]
    hits = server.metric("deepsplit_language_prefix_cache_hit_tokens")
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, **GREEDY)
    again = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, **GREEDY)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached == (len(ids) - 1) // 16 * 16 > 0  # the server's block size: 16
    assert again.choices[0].message.content == first.choices[0].message.content
    assert server.metric("deepsplit_language_prefix_cache_hit_tokens") == hits + cached
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    usage = [c.usage for c in stream if c.usage]
    assert [u.prompt_tokens_details.cached_tokens for u in usage] == [cached]


def test_api_key_is_required(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 200
