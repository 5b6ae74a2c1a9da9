"""Typed OpenAI-compatible request bodies (the subset deepsplit serves) and response builders.

Unknown fields are ignored (OpenAI clients send many); fields we do read are validated strictly,
and `null` means the field's default, as in OpenAI's API. Options that would change the answer and
that deepsplit does not implement (forced tool calls, JSON mode, suffix, best_of) are refused
rather than ignored. The HTTP layer turns a `ValidationError` into a 400 naming the field. No
engine logic here.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from language_server.api.tools import forced_call_spec
from language_server.engine.grammar import schema_spec


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Nullable(_Lenient):
    @field_validator("*", mode="before")
    @classmethod
    def _null_is_default(cls, v, info):
        """OpenAI's fields are nullable: `"temperature": null` asks for the default."""
        if v is None and info.field_name is not None:
            f = cls.model_fields[info.field_name]
            if not f.is_required():
                return f.get_default(call_default_factory=True)
        return v


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class FunctionCall(_Lenient):
    name: str
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool turn: the call it answers


class FunctionDef(_Lenient):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict | None = None


class Tool(_Lenient):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Nullable):
    include_usage: bool = False


class _Sampling(_Nullable):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="extension: 0 or -1 disables")
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, description="extension (vLLM): nothing ends the output before")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0, description="extension (vLLM, sglang)")
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for k, b in (v or {}).items():
            if not k.strip().isdigit():
                raise ValueError(f"keys must be token ids, got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"bias of token {k} is {b}; biases must be in [-100, 100]")
        return v

    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0)
    response_format: dict | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(param, why) if the request asks for something this server does not do."""
        if self.top_logprobs is not None and not self.logprobs:
            return "top_logprobs", "top_logprobs needs logprobs: true"
        if self.forced_tool_choice:
            if not self.tools:
                return "tool_choice", "tool_choice 'required' or a named function needs tools"
            if self.response_format and self.response_format.get("type", "text") != "text":
                return "response_format", "response_format cannot be combined with a forced tool_choice"
        if isinstance(self.tool_choice, dict):
            fn = self.tool_choice.get("function")
            name = fn.get("name") if isinstance(fn, dict) else None
            if self.tool_choice.get("type") != "function" or not isinstance(name, str):
                return "tool_choice", 'a named tool_choice is {"type": "function", "function": {"name": ...}}'
            if name not in {t.function.name for t in self.tools}:
                return "tool_choice", f"tool_choice names {name!r}, which is not among the tools"
        try:
            self.grammar_spec()
        except ValueError as e:
            return "response_format", str(e)
        return None

    @property
    def forced_tool_choice(self) -> bool:
        """tool_choice 'required' or a named function: the answer must be a tool call."""
        return self.tool_choice == "required" or isinstance(self.tool_choice, dict)

    @property
    def grammar_param(self) -> str:
        """The field a grammar problem is reported against."""
        return "tool_choice" if self.forced_tool_choice and self.tools else "response_format"

    def grammar_spec(self) -> str | None:
        """`response_format`, or a forced `tool_choice`, as a grammar spec (`engine/grammar.py`):
        None for free text; ValueError if malformed."""
        tools = self.tool_dicts()
        if tools and self.tool_choice == "required":
            return forced_call_spec(tools)
        if tools and isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            return forced_call_spec([t for t in tools if t["function"]["name"] == name])
        rf = self.response_format or {}
        fmt = rf.get("type", "text")
        if fmt == "text":
            return None
        if fmt == "json_object":
            return "json"
        if fmt == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise ValueError("response_format json_schema needs json_schema.schema, a JSON Schema object")
            return schema_spec(schema)
        raise ValueError(f"response_format type {fmt!r} is not one of 'text', 'json_object', 'json_schema'")

    def tool_dicts(self) -> list[dict] | None:
        """The tools the model is told about (none with tool_choice 'none')."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def logprobs_k(self) -> int | None:
        """None: no logprobs; k: each token's log-probability and its k most likely alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def to_dicts(self) -> list[dict]:
        """Messages as the plain dicts the chat template and the providers read."""
        out = []
        for m in self.messages:
            if isinstance(m.content, list):
                parts = [
                    {"type": "text", "text": p.text}
                    if isinstance(p, TextPart)
                    else {"type": "image_url", "image_url": {"url": p.image_url.url}}
                    for p in m.content
                ]
                out.append({"role": m.role, "content": parts})
            else:
                out.append({"role": m.role, "content": m.content or ""})
            if m.tool_calls:
                out[-1]["tool_calls"] = [
                    {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}
                    for c in m.tool_calls
                ]
        return out

    def image_urls(self) -> list[str]:
        return [
            p.image_url.url
            for m in self.messages
            if isinstance(m.content, list)
            for p in m.content
            if isinstance(p, ImagePart)
        ]


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]] = Field(min_length=1)  # several: a choice each
    max_tokens: int | None = Field(16, ge=0)  # 0: only with echo (score the prompt, generate nothing)
    logprobs: int | None = Field(None, ge=0)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.suffix:
            return "suffix", "suffix is not supported"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of", "best_of other than n is not supported (it would rank unseen choices)"
        if self.max_tokens == 0 and not self.echo:
            return "max_tokens", "max_tokens must be at least 1 (0 only with echo)"
        return None

    def logprobs_k(self) -> int | None:
        return self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The request's prompts: one (a string or token ids) or several."""
        p = self.prompt
        if isinstance(p, str) or isinstance(p[0], int):
            return [p]
        return list(p)

    def requested_max_tokens(self) -> int | None:
        # max_tokens 0 (echo: the prompt scored): the engine computes one token, the answer drops it
        return 1 if self.max_tokens == 0 else self.max_tokens


def _json_or_text(s: str):
    try:
        return json.loads(s)
    except ValueError:
        return s


class TokenizeRequest(_Nullable):
    """vLLM's /tokenize: `prompt` (text) or `messages` (a chat, rendered with the chat template)."""

    model: str
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True

    def to_dicts(self) -> list[dict]:
        return ChatCompletionRequest(model=self.model, messages=self.messages).to_dicts()


class DetokenizeRequest(_Nullable):
    model: str
    tokens: list[int]


def usage(prompt: int, completion: int, cached: int = 0) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chat_choice(
    index: int, text: str | None, finish: str, logprobs: dict | None = None, tool_calls: list | None = None
) -> dict:
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chat_delta(index: int, delta: dict, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}


def response(chat: bool, rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": use,
    }


def chunk(chat: bool, rid: str, model: str, created: int, choices: list[dict]) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": created,
        "model": model,
        "choices": choices,
    }
