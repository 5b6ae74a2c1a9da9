"""Every error class answers with an OpenAI-shaped body and the right status, and none wedges the
server; a disconnected stream frees its KV blocks; a full queue answers 429."""

from __future__ import annotations

import base64
import io
import threading

import httpx
import openai
import pytest
from PIL import Image

from tests.language_server.api.conftest import API_KEY, ServerProcess
from tests.language_server.conftest import data_url, image_message, make_image

pytestmark = pytest.mark.slow
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(server, body, path="/v1/chat/completions", **kw) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=AUTH, timeout=60, **kw)


def chat(content, **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


def assert_error(
    r: httpx.Response, status: int, *words: str, param: str | None = None, code: str | None = None
):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for w in words:
        assert w in err["message"], err
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def png_bytes(w: int, h: int, noise: bool = False) -> bytes:
    buf = io.BytesIO()
    (make_image(h, w, 0) if noise else Image.new("RGB", (w, h))).save(buf, "PNG")
    return buf.getvalue()


def b64url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.mark.parametrize(
    "body,status,words,param",
    [
        (chat("hi") | {"model": "gpt-4"}, 404, ["does not exist"], "model"),
        ({"model": "tiny", "messages": []}, 400, ["messages"], "messages"),
        ({"model": "tiny"}, 400, ["messages", "Field required"], "messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, ["role"], None),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, ["content"], None),
        (
            chat([{"type": "video", "video": "x.mp4"}]),
            400,
            ["messages.0.content.0:", "'video'", "'text', 'image_url'"],
            "messages.0.content.0",
        ),
        (
            chat([{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]),
            400,
            ["messages.0.content.0.image_url:", "dictionary"],
            "messages.0.content.0.image_url",
        ),
        (chat([{"type": "text"}]), 400, ["Field required"], "messages.0.content.0.text"),
        (chat("hi", max_tokens=0), 400, ["max_tokens"], "max_tokens"),
        (chat("hi", max_tokens=100000), 400, ["max_tokens", "context"], "max_tokens"),
        (chat("hi", temperature=7), 400, ["temperature"], "temperature"),
        (chat("hi", n=0), 400, ["n"], "n"),
        (chat("hi", n=17), 400, ["17 choices", "at most 16"], "n"),
        (chat("word " * 700), 400, ["context"], "messages"),
        (
            chat([{"type": "image_url", "image_url": {"url": b64url(b"hello, not an image")}}]),
            400,
            ["image 0", "not a recognised image format"],
            "messages",
        ),
        (
            chat([{"type": "image_url", "image_url": {"url": b64url(png_bytes(64, 64, noise=True)[:2000])}}]),
            400,
            ["truncated"],
            "messages",
        ),
        (
            chat([{"type": "image_url", "image_url": {"url": b64url(png_bytes(2000, 1000))}}]),
            400,
            ["2000x1000 pixels", "limit"],
            "messages",
        ),
        (
            chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]),
            400,
            ["base64"],
            None,
        ),
        (
            chat([{"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]),
            400,
            ["disabled"],
            None,
        ),
        (chat([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]), 400, ["scheme"], None),
        (
            {
                "model": "tiny",
                "messages": image_message("x", [data_url(make_image(32, 32, i)) for i in range(3)]),
            },
            400,
            ["3 images", "at most 2"],
            "messages",
        ),
        (chat("hi", top_logprobs=2), 400, ["needs logprobs"], "top_logprobs"),
        (chat("hi", min_tokens=5), 400, ["min_tokens=5 exceeds max_tokens=4"], "min_tokens"),
        (chat("hi", logprobs=True, top_logprobs=21), 400, ["max_logprobs (20)"], "top_logprobs"),
        (chat("hi", logprobs=True, top_logprobs=-1), 400, ["top_logprobs"], "top_logprobs"),
        (chat("hi", presence_penalty=2.5), 400, ["presence_penalty"], "presence_penalty"),
        (chat("hi", frequency_penalty=-3), 400, ["frequency_penalty"], "frequency_penalty"),
        (chat("hi", repetition_penalty=0), 400, ["repetition_penalty"], "repetition_penalty"),
        (chat("hi", logit_bias={"the": 5}), 400, ["token ids", "'the'"], "logit_bias"),
        (chat("hi", logit_bias={"7": 101}), 400, ["[-100, 100]"], "logit_bias"),
        (chat("hi", logit_bias={str(10**7): 1}), 400, ["logit_bias", "[0, "], "logit_bias"),
        (chat("hi", response_format={"type": "yaml"}), 400, ["'yaml' is not one of"], "response_format"),
        (
            chat("hi", response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            400,
            ["json_schema.schema"],
            "response_format",
        ),
        (
            chat("hi", response_format={"type": "json_schema", "json_schema": {"schema": {"type": "wat"}}}),
            400,
            ["response_format:"],
            "response_format",
        ),
        (
            chat("hi", min_tokens=2, response_format={"type": "json_object"}),
            400,
            ["cannot be combined"],
            "min_tokens",
        ),
        (chat("hi", tool_choice="required"), 400, ["needs tools"], "tool_choice"),
        (
            chat(
                "hi",
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice={"type": "function", "function": {"name": "g"}},
            ),
            400,
            ["'g', which is not among the tools"],
            "tool_choice",
        ),
        (
            chat(
                "hi",
                tools=[{"type": "function", "function": {"name": "f"}}],
                tool_choice={"type": "function"},
            ),
            400,
            ["a named tool_choice is"],
            "tool_choice",
        ),
        (
            chat(
                "hi",
                tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
                tool_choice="required",
            ),
            400,
            ["tool_choice:", "wat"],
            "tool_choice",
        ),
    ],
    ids=[
        "unknown-model",
        "empty-messages",
        "no-messages",
        "bad-role",
        "bad-content",
        "unknown-content-part",
        "image-url-not-an-object",
        "text-part-without-text",
        "max-tokens-0",
        "max-tokens-too-big",
        "temperature",
        "n-0",
        "n-too-many",
        "prompt-too-long",
        "not-an-image",
        "truncated-image",
        "decompression-bomb",
        "bad-base64",
        "http-disabled",
        "bad-scheme",
        "too-many-images",
        "top-logprobs-without-logprobs",
        "min-tokens",
        "too-many-logprobs",
        "negative-top-logprobs",
        "presence-penalty",
        "frequency-penalty",
        "repetition-penalty",
        "logit-bias-key",
        "logit-bias-value",
        "logit-bias-id",
        "response-format-unknown",
        "json-schema-missing",
        "json-schema-invalid",
        "json-with-min-tokens",
        "tool-choice-required-without-tools",
        "tool-choice-unknown-name",
        "tool-choice-named-malformed",
        "tool-choice-bad-parameters",
    ],
)
def test_bad_requests(server, body, status, words, param):
    assert_error(post(server, body), status, *words, param=param)


def test_malformed_json_non_object_and_oversized_bodies(server):
    before = server.metric('deepsplit_language_errors_total{code="invalid_json",status="400"}')
    r = httpx.post(
        server.url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', headers=AUTH
    )
    assert_error(r, 400, "not valid JSON", code="invalid_json")
    assert_error(post(server, [1, 2]), 400, "JSON object")
    assert_error(post(server, chat("x" * 2_500_000)), 413, "exceeds the limit")
    assert server.metric('deepsplit_language_errors_total{code="invalid_json",status="400"}') == before + 2


def test_completions_errors(server):
    assert_error(post(server, {"model": "tiny", "prompt": [1, 10**9]}, "/v1/completions"), 400, "token ids")
    assert_error(post(server, {"model": "tiny", "prompt": ""}, "/v1/completions"), 400, param="prompt")
    assert_error(
        post(server, {"model": "tiny", "prompt": "hi", "stop_token_ids": [-1]}, "/v1/completions"), 400
    )
    for extra, words, param in [
        ({"logprobs": 21}, ["max_logprobs"], "logprobs"),
        ({"max_tokens": 0}, ["0 only with echo"], "max_tokens"),
        ({"prompt": [[1] * 600]}, ["600 tokens", "context"], "prompt"),
        ({"suffix": "end"}, ["suffix"], "suffix"),
        ({"best_of": 2}, ["best_of other than n"], "best_of"),
        ({"prompt": ["a", "b"], "n": 9}, ["18 choices"], "n"),
        ({"prompt": ["a", ""]}, ["prompt is empty"], "prompt"),
        ({"prompt": [[1, 2], []]}, ["prompt is empty"], "prompt"),
    ]:
        body = {"model": "tiny", "prompt": "hi", **extra}
        assert_error(post(server, body, "/v1/completions"), 400, *words, param=param)


def test_null_fields_mean_their_defaults(server):
    """OpenAI's request fields are nullable; some clients send every field, unset ones as null."""
    nulls = dict.fromkeys(
        ["temperature", "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty"]
        + ["logit_bias", "logprobs", "top_logprobs", "stream", "stream_options", "response_format"]
        + ["tools", "tool_choice", "max_completion_tokens"]
    )
    r = post(server, chat("hi", **nulls))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 4 or r.json()["choices"][0]["finish_reason"] == "stop"
    body = {"model": "tiny", "prompt": "hi", "max_tokens": None, "logprobs": None, "echo": None}
    r = post(server, body, "/v1/completions")
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 16 and r.json()["choices"][0]["logprobs"] is None


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=10**6
        )
    assert e.value.code == "context_length_exceeded"


def test_server_still_serves_after_errors_and_holds_nothing(server, client):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "ok?"}], max_tokens=3
    )
    assert r.usage.completion_tokens <= 3
    stats = httpx.get(server.url + "/debug/engine").json()
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0 and stats["waiting_for_embeddings"] == 0


def wait_for(server, pred, what: str, limit: int = 600) -> dict:
    """Poll /debug/engine until `pred(stats)`; a generous bound so a broken server fails instead of hanging."""
    for _ in range(limit):
        stats = httpx.get(server.url + "/debug/engine").json()
        if pred(stats):
            return stats
        threading.Event().wait(0.05)
    raise AssertionError(f"never saw {what}: {stats}")


def test_disconnected_stream_frees_its_kv_blocks(server):
    body = chat("Tell me everything.", max_tokens=400, stream=True, ignore_eos=True, temperature=0)
    aborted = server.metric("deepsplit_language_aborted_requests_total")
    with (
        httpx.Client(timeout=60, headers=AUTH) as c,
        c.stream("POST", server.url + "/v1/chat/completions", json=body) as r,
    ):
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(x.startswith("data: ") for x in got)
        assert httpx.get(server.url + "/debug/engine").json()["kv_blocks_used"] > 0
    wait_for(server, lambda s: s["kv_blocks_used"] == 0 and s["running"] == 0, "the blocks freed")
    assert server.metric("deepsplit_language_aborted_requests_total") == aborted + 1


def test_full_queue_answers_429_and_recovers(tiny_model_dir):
    narrow = ServerProcess(
        tiny_model_dir, "--max-num-seqs", "1", "--max-waiting-requests", "1", "--debug-endpoints"
    )
    try:
        long = chat("go on", max_tokens=3000, stream=True, ignore_eos=True, temperature=0)
        with httpx.Client(timeout=60, headers=AUTH) as c:
            with c.stream("POST", narrow.url + "/v1/chat/completions", json=long) as a:
                a_lines = a.iter_lines()  # keep it referenced: a collected iterator closes the connection
                next(a_lines)
                with c.stream("POST", narrow.url + "/v1/chat/completions", json=long) as b:
                    assert b.status_code == 200
                    wait_for(narrow, lambda s: s["waiting"] == 1 and s["running"] == 1, "one queued")
                    r = post(narrow, chat("and me?"))
                    assert_error(r, 429, "overloaded")
                    assert r.headers.get("retry-after") == "1"
        wait_for(
            narrow, lambda s: s["kv_blocks_used"] == 0 and s["running"] == 0 and s["waiting"] == 0, "idle"
        )
        assert post(narrow, chat("now?")).status_code == 200
    finally:
        narrow.stop()
