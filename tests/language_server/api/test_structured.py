"""Structured output through the real server and the real `openai` client: response_format
json_object and json_schema (streamed or not, with an image, several choices) answer JSON that
parses and fits; the SDK's own `parse` helper reads it into a pydantic model."""

from __future__ import annotations

import json

import pydantic
import pytest

from tests.language_server.conftest import data_url, image_message, make_image

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 16}, "rank": {"type": "integer", "minimum": 1}},
    "required": ["city", "rank"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "Name a city and its rank, as JSON."}]


def fits(text: str) -> dict:
    obj = json.loads(text)
    assert list(obj) == ["city", "rank"] and isinstance(obj["city"], str) and obj["rank"] >= 1, obj
    return obj


def test_json_schema_answers_fit_streamed_or_not(client):
    r = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=60, temperature=0, response_format=FORMAT
    )
    assert r.choices[0].finish_reason == "stop"
    fits(r.choices[0].message.content)
    stream = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=60, temperature=0, response_format=FORMAT, stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == r.choices[0].message.content


def test_several_sampled_choices_each_fit(client):
    r = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=60, temperature=1.0, seed=3, n=3, response_format=FORMAT
    )
    assert len(r.choices) == 3 and all(c.finish_reason == "stop" for c in r.choices)
    for c in r.choices:
        fits(c.message.content)


def test_json_object_and_an_image_request(client):
    r = client.chat.completions.create(
        model="tiny", messages=ASK, max_tokens=40, temperature=0, response_format={"type": "json_object"}
    )
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(r.choices[0].message.content), dict)
    messages = image_message("Which city is this? Answer as JSON.", [data_url(make_image(64, 96, 7))])
    r = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=60, temperature=0, response_format=FORMAT
    )
    fits(r.choices[0].message.content)


def test_the_sdk_parse_helper_reads_the_answer(client):
    class City(pydantic.BaseModel):  # bounded: the random tiny model would never end a free string
        city: str = pydantic.Field(max_length=16)
        rank: int = pydantic.Field(ge=1, le=999)

    r = client.chat.completions.parse(
        model="tiny", messages=ASK, max_tokens=80, temperature=0, response_format=City
    )
    assert isinstance(r.choices[0].message.parsed, City)
