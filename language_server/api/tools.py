"""Tool calls in Qwen's (Hermes) format: the request's tools and tool turns as plain chat messages, and
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks in the answer as OpenAI tool calls.

`with_tools(messages, tools)` puts the function signatures into the system turn and turns assistant
`tool_calls` and `tool` results into the text Qwen's models were trained on, so every path that
renders a chat (the chat template here, an encode server's for image prompts) needs nothing more.
`parse` splits a finished answer; `StreamParser` does it on the fly, holding back only text that
may still open a block. A block that is not valid JSON with a name stays text. `forced_call_spec`
is the grammar (`engine/grammar.py`) of `tool_choice` `required` or a named function: exactly one
block, calling one of the allowed tools with arguments that fit its parameters.
"""

from __future__ import annotations

import json
import uuid

from language_server.engine.grammar import tagged_spec

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
    '"arguments": <args-json-object>}\n</tool_call>'
)


def with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """`messages` (plain dicts) with the tools in the system turn and tool turns as text."""
    out = []
    if tools:
        signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        system = _PREAMBLE + signatures + _POSTAMBLE
        if messages and messages[0]["role"] == "system" and isinstance(messages[0]["content"], str):
            system = messages[0]["content"] + "\n\n" + system
            messages = messages[1:]
        out.append({"role": "system", "content": system})
    for m in messages:
        if m["role"] == "tool":
            out.append(
                {"role": "user", "content": f"<tool_response>\n{_text(m['content'])}\n</tool_response>"}
            )
        elif m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(
                f"{OPEN}\n{json.dumps(c, ensure_ascii=False)}\n{CLOSE}" for c in m["tool_calls"]
            )
            text = _text(m["content"])
            out.append({"role": "assistant", "content": (text + "\n" if text else "") + calls})
        else:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
    return out


def _text(content) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content)
    return content or ""


def _call(block: str) -> dict | None:
    """An OpenAI tool call from the JSON inside a block, or None if it is not one."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)},
    }


def parse(text: str) -> tuple[str | None, list[dict]]:
    """(the text outside tool-call blocks, None if only blocks; the calls)."""
    p = StreamParser()
    content, calls = p.feed(text)
    content += p.flush()
    if calls and not content.strip():
        return None, calls
    return content, calls


class StreamParser:
    def __init__(self) -> None:
        self._buf = ""  # held back: a possible start of OPEN, or an unfinished block
        self._inside = False

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """-> (text that is certainly content, calls completed by `text`)."""
        self._buf += text
        out, calls = [], []
        while True:
            if self._inside:
                end = self._buf.find(CLOSE)
                if end < 0:
                    return "".join(out), calls
                block, self._buf = self._buf[:end], self._buf[end + len(CLOSE) :]
                self._inside = False
                call = _call(block.strip())
                if call is not None:
                    calls.append(call)
                else:
                    out.append(OPEN + block + CLOSE)
                continue
            start = self._buf.find(OPEN)
            if start >= 0:
                out.append(self._buf[:start])
                self._buf, self._inside = self._buf[start + len(OPEN) :], True
                continue
            keep = _partial_open(self._buf)
            out.append(self._buf[: len(self._buf) - keep])
            self._buf = self._buf[len(self._buf) - keep :]
            return "".join(out), calls

    def flush(self) -> str:
        """The answer ended: whatever is held back is text (an unclosed block too)."""
        rest = (OPEN if self._inside else "") + self._buf
        self._buf, self._inside = "", False
        return rest


def _partial_open(s: str) -> int:
    """Length of the longest suffix of `s` that OPEN starts with."""
    for n in range(min(len(s), len(OPEN) - 1), 0, -1):
        if OPEN.startswith(s[-n:]):
            return n
    return 0


def forced_call_spec(tools: list[dict]) -> str:
    """One call of one of `tools` (OpenAI tool dicts), as a grammar spec."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": t["function"]["name"]},
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return tagged_spec(OPEN + "\n", calls[0] if len(calls) == 1 else {"anyOf": calls}, "\n" + CLOSE)
