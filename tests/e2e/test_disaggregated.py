"""End to end with real processes and the real `openai` client: image chat through encode servers
over ZMQ and Mooncake equals monolithic and transformers; both encoders take load; bad images get a
400 naming the problem; extreme shapes work or get such a 400; the receive pool always drains."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from PIL import Image

from tests.e2e.conftest import openai_client
from tests.language_server.conftest import data_url, image_message, make_image

pytestmark = pytest.mark.slow
GREEDY = {"temperature": 0, "extra_body": {"ignore_eos": True}}
MODES = ["zmq", "mooncake", "mono"]

CASES = {
    "one_png": [("PNG", 64, 96, 1)],
    "png_and_jpeg": [("PNG", 96, 128, 2), ("JPEG", 64, 64, 3)],
    "three_sizes": [("PNG", 32, 32, 4), ("JPEG", 80, 48, 5), ("PNG", 128, 64, 6)],
}


def case_messages(case):
    imgs = [(make_image(h, w, seed), fmt) for fmt, h, w, seed in CASES[case]]
    return image_message(f"Compare these {len(imgs)} pictures.", [data_url(i, f) for i, f in imgs])


def chat(url: str, messages, n: int = 8, stream: bool = False) -> str:
    c = openai_client(url)
    if not stream:
        return (
            c.chat.completions.create(model="tiny", messages=messages, max_tokens=n, **GREEDY)
            .choices[0]
            .message.content
        )
    chunks = c.chat.completions.create(model="tiny", messages=messages, max_tokens=n, stream=True, **GREEDY)
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def oracle(hf, pre, messages, n: int, logprobs: bool = False):
    """transformers' greedy answer (with `logprobs`: its tokens and each step's log-softmax)."""
    urls = [p["image_url"]["url"] for m in messages for p in m["content"] if p.get("type") == "image_url"]
    decoded = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))).convert("RGB") for u in urls]
    p = pre.prepare(messages, decoded)
    ids = torch.tensor([p.input_ids])
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pixel_values=p.pixel_values,
            image_grid_thw=torch.tensor(p.grid_thw),
            mm_token_type_ids=(ids == pre.image_token_id).int(),
            output_logits=logprobs,
            return_dict_in_generate=logprobs,
        )
    if logprobs:
        toks = out.sequences[0, ids.shape[1] :].tolist()
        return toks, [torch.log_softmax(x[0].float(), -1) for x in out.logits]
    return pre.decode(out[0, ids.shape[1] :].tolist())


@pytest.fixture(scope="module")
def pre(tiny_model_dir):
    from deepsplit.model.processor import Preprocessor

    return Preprocessor.from_dir(tiny_model_dir)


def pool_used(proc) -> float:
    return proc.metric("deepsplit_language_mm_buffer_blocks_used")


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_identical_across_zmq_mooncake_monolithic_and_transformers(case, cluster, hf_oracle, pre):
    messages = case_messages(case)
    outs = {mode: chat(cluster[mode].url, messages) for mode in MODES}
    want = oracle(hf_oracle, pre, messages, 8)
    assert outs == {mode: want for mode in MODES}
    for mode in ("zmq", "mooncake"):
        assert chat(cluster[mode].url, messages, stream=True) == want
        assert pool_used(cluster[mode]) == 0
    transfer = httpx.get(cluster["mooncake"].url + "/debug/engine").json()["transfer"]
    assert transfer["resumes"] >= 2 and transfer.get("failed", 0) == 0  # rooms of 8 rows: resumed


def test_image_logprobs_equal_across_modes_and_transformers(cluster, hf_oracle, pre):
    messages = case_messages("png_and_jpeg")
    toks, lps = oracle(hf_oracle, pre, messages, 4, logprobs=True)
    for mode in MODES:
        r = openai_client(cluster[mode].url).chat.completions.create(
            model="tiny", messages=messages, max_tokens=4, logprobs=True, top_logprobs=2, **GREEDY
        )
        content = r.choices[0].logprobs.content
        assert [e.token for e in content] == [pre.tokenizer.decode([t]) for t in toks], mode
        for e, t, lp in zip(content, toks, lps, strict=True):
            assert e.logprob == pytest.approx(lp[t].item(), abs=1e-3), mode
            assert [x.token for x in e.top_logprobs] == [
                pre.tokenizer.decode([i]) for i in lp.topk(2).indices
            ]


def test_an_image_request_with_several_choices_encodes_once(cluster, hf_oracle, pre):
    """n = 3: the images are encoded once; the first choice reads the received rows, the others a
    copy; all three equal transformers, and the receive pool drains."""
    messages = case_messages("one_png")
    want = oracle(hf_oracle, pre, messages, 6)
    encs = [cluster["enc0"], cluster["enc1"]]
    for mode in ("zmq", "mooncake"):
        before = sum(e.metric('deepsplit_encode_requests_total{status="ok"}') for e in encs)
        r = openai_client(cluster[mode].url).chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, n=3, **GREEDY
        )
        assert [c.message.content for c in r.choices] == [want] * 3, mode
        assert sum(e.metric('deepsplit_encode_requests_total{status="ok"}') for e in encs) == before + 1
        assert pool_used(cluster[mode]) == 0


def test_an_image_request_with_tools_counts_the_same_everywhere(cluster):
    """The tools reach the encoder's rendering of an image prompt as they reach monolithic's."""
    tools = [{"type": "function", "function": {"name": "zoom", "parameters": {"type": "object"}}}]
    messages = case_messages("one_png")
    counts = {
        mode: openai_client(cluster[mode].url)
        .chat.completions.create(model="tiny", messages=messages, tools=tools, max_tokens=2, **GREEDY)
        .usage.prompt_tokens
        for mode in MODES
    }
    bare = openai_client(cluster["mono"].url).chat.completions.create(
        model="tiny", messages=messages, max_tokens=2, **GREEDY
    )
    assert len(set(counts.values())) == 1 and counts["mono"] > bare.usage.prompt_tokens, counts


def test_an_image_request_with_a_json_schema_answers_the_same_everywhere(cluster):
    """Structured output on an image request: the same JSON over zmq, mooncake and monolithic, and a
    second identical request reuses the prompt's cached blocks (image digests included) in each."""
    schema = {
        "type": "object",
        "properties": {"label": {"enum": ["cat", "dog", "car"]}, "count": {"type": "integer", "maximum": 9}},
        "required": ["label", "count"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "seen", "schema": schema}}
    messages = case_messages("one_png")
    got = {}
    for mode in MODES:
        c = openai_client(cluster[mode].url)
        first, again = (
            c.chat.completions.create(
                model="tiny", messages=messages, max_tokens=40, temperature=0, response_format=fmt
            )
            for _ in range(2)
        )
        got[mode] = first.choices[0].message.content
        assert again.choices[0].message.content == got[mode], mode
        assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 16, mode
    assert len(set(got.values())) == 1, got
    obj = json.loads(got["mono"])
    assert obj["label"] in ("cat", "dog", "car") and isinstance(obj["count"], int) and obj["count"] <= 9


def test_both_encoders_take_load_and_text_needs_none(cluster):
    encs = [cluster["enc0"], cluster["enc1"]]
    before = [e.metric('deepsplit_encode_requests_total{status="ok"}') for e in encs]
    msgs = [image_message(f"Picture {i}?", [data_url(make_image(48, 48, 100 + i))]) for i in range(8)]
    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda m: chat(cluster["zmq"].url, m, n=4), msgs))
    assert all(isinstance(o, str) for o in outs)
    after = [e.metric('deepsplit_encode_requests_total{status="ok"}') for e in encs]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert sum(after) - sum(before) == 8
    text = [{"role": "user", "content": "Hello"}]
    assert chat(cluster["zmq"].url, text, n=4) == chat(cluster["mono"].url, text, n=4)


def test_both_claim_modes_serve_mooncake_identically(cluster):
    """enc1 claims its rooms as soon as it knows their rows, enc0 at send time: over Mooncake (rooms
    of 8 rows, so claimed rooms resume too) both give the monolithic answers and free every block."""
    encs = [cluster["enc0"], cluster["enc1"]]
    before = [e.metric('deepsplit_encode_requests_total{status="ok"}') for e in encs]
    msgs = [image_message(f"Scene {i}?", [data_url(make_image(40, 56, 300 + i))]) for i in range(8)]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda m: chat(cluster["mooncake"].url, m, n=4), msgs))
    assert got == [chat(cluster["mono"].url, m, n=4) for m in msgs]
    after = [e.metric('deepsplit_encode_requests_total{status="ok"}') for e in encs]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    assert pool_used(cluster["mooncake"]) == 0


def _png_bytes(img) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG")
    return b.getvalue()


def _url(data: bytes, mime: str = "png") -> str:
    return f"data:image/{mime};base64," + base64.b64encode(data).decode()


BAD = {
    "not_an_image": (_url(b"definitely not pixels"), "not a recognised image format"),
    "truncated_png": (_url(_png_bytes(make_image(64, 64, 9))[:300]), "truncated or corrupt"),
    "decompression_bomb": (_url(_png_bytes(Image.new("RGB", (3000, 3000)))), "pixels, more than the limit"),
    "ftp_scheme": ("ftp://example.com/cat.png", "unsupported image URL scheme"),
    "file_scheme": ("file:///etc/passwd", "unsupported image URL scheme"),
    "http_disabled": ("http://127.0.0.1:9/cat.png", "disabled"),
}


@pytest.mark.parametrize("mode", ["zmq", "mooncake"])
@pytest.mark.parametrize("name", list(BAD))
def test_bad_images_get_400_naming_the_problem(name, mode, cluster):
    url, words = BAD[name]
    with pytest.raises(openai.BadRequestError) as e:
        chat(cluster[mode].url, image_message("What is it?", [url]))
    assert e.value.status_code == 400 and words in e.value.message, e.value.message
    assert httpx.get(cluster[mode].url + "/health").status_code == 200
    assert pool_used(cluster[mode]) == 0


@pytest.mark.parametrize("h,w", [(1, 1), (1, 4000), (4000, 1), (2, 2)])
def test_extreme_shapes_work_or_get_a_400(h, w, cluster):
    messages = image_message("Shape?", [data_url(Image.new("RGB", (w, h), (200, 10, 10)))])
    outs = {}
    for mode in MODES:
        try:
            outs[mode] = chat(cluster[mode].url, messages, n=4)
        except openai.BadRequestError as e:
            assert "image" in e.message, e.message
            outs[mode] = "400"
    assert len(set(outs.values())) == 1, outs  # every mode decides the same way
    assert pool_used(cluster["zmq"]) == 0 and pool_used(cluster["mooncake"]) == 0


def test_cancelled_streams_free_their_rooms(cluster):
    url = cluster["zmq"].url
    for i in range(4):
        msgs = image_message("Describe at length.", [data_url(make_image(64, 64, 200 + i))])
        stream = openai_client(url).chat.completions.create(
            model="tiny", messages=msgs, max_tokens=200, stream=True, **GREEDY
        )
        next(iter(stream))
        stream.close()
    end = time.monotonic() + 20
    while pool_used(cluster["zmq"]) != 0 and time.monotonic() < end:
        time.sleep(0.2)
    assert pool_used(cluster["zmq"]) == 0
