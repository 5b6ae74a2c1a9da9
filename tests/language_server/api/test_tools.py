"""Tool calls: the Hermes-format parser (whole answers and streamed in any split), the tools and
tool turns as chat text, the answer's tool_calls in JSON and SSE (the engine's outputs faked: a
random checkpoint never calls a tool), and the real server rendering tools and tool turns."""

from __future__ import annotations

import asyncio
import json

import pytest

from language_server.api.responses import Answer, Choice
from language_server.api.tools import StreamParser, parse, with_tools
from language_server.engine.engine import RequestOutput

CALLS = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "now"}\n</tool_call>'
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def names_args(calls) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_parse_takes_calls_out_and_leaves_the_rest():
    content, calls = parse(CALLS)
    assert content == "Let me look.\n\n"
    assert names_args(calls) == [("get_weather", {"city": "Paris", "unit": "C"}), ("now", {})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    only, calls = parse('<tool_call>{"name": "now"}</tool_call>')
    assert only is None and names_args(calls) == [("now", {})]
    for text in [
        "plain text",
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"x": 1}</tool_call>',
        "a <tool_c",
    ]:
        assert parse(text) == (text, [])  # not a call: it stays text, unclosed blocks too
    assert parse("<tool_call>{unclosed") == ("<tool_call>{unclosed", [])


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_the_stream_parser_agrees_with_parse_in_any_split(step):
    for text in [CALLS, "a <tool_c", "<tool_call>{bad}</tool_call> then <tool_call>\n"]:
        p, out, calls = StreamParser(), "", []
        for i in range(0, len(text), step):
            a, b = p.feed(text[i : i + step])
            out, calls = out + a, calls + b
        out += p.flush()
        want_content, want_calls = parse(text)
        assert out == (want_content or "") and names_args(calls) == names_args(want_calls)


def test_with_tools_puts_signatures_in_the_system_turn_and_tool_turns_in_text():
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}],
        },
        {"role": "tool", "content": "18 C, sunny"},
    ]
    out = with_tools(msgs, [t | {} for t in TOOLS])
    assert [m["role"] for m in out] == ["system", "user", "assistant", "user"]
    assert out[0]["content"].startswith("Be brief.\n\n# Tools") and json.dumps(TOOLS[0]) in out[0]["content"]
    assert json.loads(out[2]["content"].removeprefix("<tool_call>\n").removesuffix("\n</tool_call>")) == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert out[3]["content"] == "<tool_response>\n18 C, sunny\n</tool_response>"
    assert with_tools(msgs[:2], None) == msgs[:2]


class _Text:
    def chat(self, lps):
        return {"content": []}


async def _events(pieces: list[str], finish: str):
    for k, t in enumerate(pieces):
        last = k == len(pieces) - 1
        yield 0, RequestOutput("r", t, (k,), last, finish if last else None, 5, k + 1)


def run_answer(pieces: list[str], stream: bool, finish: str = "stop"):
    answer = Answer(True, "chatcmpl-x", "tiny", [Choice(0, [1], tools=True)], _Text(), False)

    async def go():
        if not stream:
            return await answer.json(_events(pieces, finish))
        return [line async for line in answer.sse(_events(pieces, finish))]

    return asyncio.run(go())


def test_answers_carry_tool_calls_in_json_and_in_the_stream():
    pieces = [CALLS[i : i + 5] for i in range(0, len(CALLS), 5)]  # as tokens would come
    body = run_answer(pieces, stream=False)
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Let me look.\n\n"
    assert names_args(choice["message"]["tool_calls"]) == [
        ("get_weather", {"city": "Paris", "unit": "C"}),
        ("now", {}),
    ]
    assert run_answer(pieces, stream=False, finish="length")["choices"][0]["finish_reason"] == "length"

    chunks = [json.loads(x[6:]) for x in run_answer(pieces, stream=True) if x.startswith("data: {")]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("content") or "" for d in deltas) == "Let me look.\n\n"
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert [tc["index"] for tc in calls] == [0, 1]
    assert names_args(calls) == names_args(choice["message"]["tool_calls"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == [
        "tool_calls"
    ]
    assert not any("<tool_call>" in (d.get("content") or "") for d in deltas)


@pytest.mark.slow
def test_the_server_renders_tools_and_tool_turns(client, tiny_model_dir):
    from deepsplit.model.processor import Preprocessor

    pre = Preprocessor.from_dir(tiny_model_dir)
    user = [{"role": "user", "content": "Weather in Paris?"}]
    turns = user + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    for messages in (user, turns):
        r = client.chat.completions.create(
            model="tiny", messages=messages, tools=TOOLS, max_tokens=3, temperature=0
        )
        plain = [
            {**m, "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
            if m.get("tool_calls")
            else m
            for m in messages
        ]
        ids = pre.tokenizer(pre.render(with_tools(plain, TOOLS)), add_special_tokens=False)["input_ids"]
        assert r.usage.prompt_tokens == len(ids)
        assert r.choices[0].message.tool_calls is None  # this random model calls nothing
    none = client.chat.completions.create(
        model="tiny", messages=user, tools=TOOLS, tool_choice="none", max_tokens=3
    )
    bare = client.chat.completions.create(model="tiny", messages=user, max_tokens=3)
    assert none.usage.prompt_tokens == bare.usage.prompt_tokens  # 'none': the model is not told of them
    import openai

    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="tiny", messages=user, tools=[{"type": "function"}])


BOUNDED = [  # arguments the random tiny model must finish within its budget
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Oslo"]},
                    "days": {"type": "integer", "maximum": 7},
                },
                "required": ["city", "days"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "parameters": {
                "type": "object",
                "properties": {"zone": {"enum": ["UTC", "CET"]}},
                "required": ["zone"],
                "additionalProperties": False,
            },
        },
    },
]


def test_a_forced_tool_choice_always_calls_a_tool_with_fitting_arguments(client):
    user = [{"role": "user", "content": "What is the weather?"}]
    fits = {
        "get_weather": lambda a: (
            list(a) == ["city", "days"] and a["city"] in ("Paris", "Oslo") and a["days"] <= 7
        ),
        "get_time": lambda a: a == {"zone": "UTC"} or a == {"zone": "CET"},
    }
    for choice, names in (
        ("required", {"get_weather", "get_time"}),
        ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
    ):
        r = client.chat.completions.create(
            model="tiny", messages=user, tools=BOUNDED, tool_choice=choice, max_tokens=60, temperature=0
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c
        ((name, args),) = names_args([tc.model_dump() for tc in c.message.tool_calls])
        assert name in names and fits[name](args), (name, args)
        stream = client.chat.completions.create(
            model="tiny",
            messages=user,
            tools=BOUNDED,
            tool_choice=choice,
            max_tokens=60,
            temperature=0,
            stream=True,
        )
        chunks = [ch for ch in stream if ch.choices]
        deltas = [tc for ch in chunks for tc in ch.choices[0].delta.tool_calls or []]
        assert [d.function.name for d in deltas if d.function.name] == [name]
        assert json.loads("".join(d.function.arguments or "" for d in deltas)) == args
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
