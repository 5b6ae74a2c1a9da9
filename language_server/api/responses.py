"""One request's answer assembled from its choices' engine outputs: the JSON body, or the SSE stream.

A request has one or more choices (`n`, or several completion prompts), each one engine sequence;
`events` yields (choice index, RequestOutput) until every choice has finished. The stream tags each
chunk with its choice's index, ends each choice with its own finish chunk and the request with the
usage chunk (if asked) and `[DONE]`. Usage counts each prompt once and every choice's tokens.
No engine calls here: whoever owns `events` aborts what an error or a disconnect leaves running.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from language_server.api import protocol as P
from language_server.api.errors import APIError
from language_server.api.logprobs import TokenText, joined
from language_server.api.tools import StreamParser, parse
from language_server.engine.engine import RequestOutput
from language_server.engine.sampler import TokenLogprobs


@dataclass
class Choice:
    index: int
    prompt_ids: list[int]
    echo: str = ""  # completions' echo: the prompt text the choice's text starts with
    keep: bool = True  # False: its one generated token is left out (max_tokens 0 with echo)
    counts_prompt: bool = True  # the first choice of its prompt: usage counts the prompt once
    tools: bool = False  # the model was given tools: its tool-call blocks become tool_calls
    # collected while answering
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprobs, ...] | None = None
    last: RequestOutput | None = None


class Answer:
    def __init__(
        self,
        chat: bool,
        rid: str,
        model: str,
        choices: list[Choice],
        token_text: TokenText,
        want_logprobs: bool,
        include_usage: bool = False,
    ) -> None:
        self.chat, self.rid, self.model, self.choices = chat, rid, model, choices
        self.tt, self.want_logprobs, self.include_usage = token_text, want_logprobs, include_usage

    def _usage(self) -> dict:
        last = [c.last for c in self.choices]
        prompt = sum(
            o.prompt_tokens for c, o in zip(self.choices, last, strict=True) if o and c.counts_prompt
        )
        done = sum(o.completion_tokens for c, o in zip(self.choices, last, strict=True) if o and c.keep)
        cached = sum(
            o.cached_tokens for c, o in zip(self.choices, last, strict=True) if o and c.counts_prompt
        )
        return P.usage(prompt, done, cached)

    def _logprobs(self, c: Choice, lps: list[TokenLogprobs], offset: int, prompt=None) -> dict | None:
        """The choice's `logprobs` for these tokens (and, with `prompt`, its echoed prompt's first)."""
        if not self.want_logprobs:
            return None
        if self.chat:
            return self.tt.chat(lps)
        out = self.tt.completion(lps, offset)
        return joined(self.tt.prompt(c.prompt_ids, prompt), out) if prompt is not None else out

    # -- JSON ---------------------------------------------------------------------------------
    async def json(self, events: AsyncIterator[tuple[int, RequestOutput]]) -> dict:
        """The whole answer; an error or abort of any choice raises (the caller aborts the rest)."""
        async for i, out in events:
            c = self.choices[i]
            c.last = out
            if out.finish_reason == "error":
                raise APIError(out.error_status, out.error or "generation failed")
            if out.finish_reason == "abort":
                raise APIError(499, "request aborted", code="aborted", type_="aborted")
            if c.keep:
                c.text.append(out.text)
                c.logprobs.extend(out.logprobs)
            if c.prompt_logprobs is None:
                c.prompt_logprobs = out.prompt_logprobs
        body = []
        for c in self.choices:
            prompt = (c.prompt_logprobs or ()) if c.echo else None
            lps = self._logprobs(c, c.logprobs, len(c.echo), prompt)
            text = c.echo + "".join(c.text)
            if not self.chat:
                body.append(P.completion_choice(c.index, text, c.last.finish_reason, lps))
                continue
            calls = None
            if c.tools:
                text, calls = parse(text)
            body.append(P.chat_choice(c.index, text, _finish(c.last.finish_reason, calls), lps, calls))
        return P.response(self.chat, self.rid, self.model, body, self._usage())

    # -- SSE ----------------------------------------------------------------------------------
    async def sse(self, events: AsyncIterator[tuple[int, RequestOutput]]) -> AsyncIterator[str]:
        created = int(time.time())
        offsets = {c.index: len(c.echo) for c in self.choices}  # completions' text_offset so far
        echoed: set[int] = set()
        parsers = {c.index: StreamParser() for c in self.choices if c.tools}
        called: dict[int, int] = {}  # choice -> tool calls sent

        def send(choice: dict) -> str:
            body = P.chunk(self.chat, self.rid, self.model, created, [choice])
            if self.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body)}\n\n"

        def piece(c: Choice, text: str, lps=(), finish=None, prompt=None) -> str:
            logprobs = None
            if lps or prompt is not None:
                logprobs = self._logprobs(c, list(lps), offsets[c.index], prompt)
                if not self.chat and prompt is None and logprobs is not None:
                    offsets[c.index] += sum(len(t) for t in logprobs["tokens"])
            if self.chat:
                delta = {"content": text} if finish is None else {}
                return send(P.chat_delta(c.index, delta, finish, logprobs))
            return send(P.completion_choice(c.index, text, finish, logprobs))

        try:
            if self.chat:
                for c in self.choices:
                    yield send(P.chat_delta(c.index, {"role": "assistant", "content": ""}, None))
            async for i, out in events:
                c = self.choices[i]
                c.last = out
                if out.finish_reason == "error":
                    err = APIError(out.error_status, out.error or "generation failed").body()
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                if c.echo and i not in echoed:  # first, with the prompt's logprobs (they come now)
                    echoed.add(i)
                    yield piece(c, c.echo, prompt=(out.prompt_logprobs or ()) if self.want_logprobs else None)
                lps = out.logprobs if self.want_logprobs and c.keep else ()
                text, calls = out.text, []
                if i in parsers:
                    text, calls = parsers[i].feed(text)
                    if out.finished:
                        text += parsers[i].flush()
                if c.keep and (text or lps):
                    yield piece(c, text, lps)
                for call in calls:
                    k = called[i] = called.get(i, 0) + 1
                    yield send(P.chat_delta(c.index, {"tool_calls": [{"index": k - 1, **call}]}, None))
                if out.finished:
                    yield piece(c, "", finish=_finish(out.finish_reason, called.get(i)))
            else:
                if self.include_usage:
                    body = P.chunk(self.chat, self.rid, self.model, created, [])
                    body["usage"] = self._usage()
                    yield f"data: {json.dumps(body)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()


def _finish(reason: str, calls) -> str:
    """OpenAI's finish reason: a choice that stopped after calling tools says so."""
    return "tool_calls" if calls and reason == "stop" else reason
