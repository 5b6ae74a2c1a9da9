"""The OpenAI endpoints' logic: request -> prompt + sampling params -> engine -> JSON or SSE chunks.

Text prompts are tokenised here; image prompts are handed to the `MultimodalProvider` while the
request already sits in the scheduler as waiting-for-embeddings. A client that goes away aborts
its request (the engine frees its KV blocks and vision rows). HTTP plumbing lives in `app.py`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from language_server.api import protocol as P
from language_server.api.errors import APIError, bad_request
from language_server.api.logprobs import TokenText, joined
from language_server.api.metrics import Metrics
from language_server.engine.engine import Engine, RequestOutput
from language_server.engine.sequence import SamplingParams, Sequence, Status
from language_server.mm.base import BadMultimodalInput, EncoderUnavailable, MultimodalProvider


class Serving:
    def __init__(
        self,
        settings,
        engine: Engine,
        preprocessor,
        provider: MultimodalProvider | None,
        metrics: Metrics,
        max_model_len: int,
        vocab_size: int,
    ) -> None:
        self.s, self.engine, self.pre, self.provider = settings, engine, preprocessor, provider
        self.metrics, self.max_model_len, self.vocab_size = metrics, max_model_len, vocab_size
        self.token_text = TokenText(preprocessor.tokenizer)

    # -- endpoints ----------------------------------------------------------------------------
    async def chat(self, request: Request, body: P.ChatCompletionRequest) -> object:
        self._check_model(body)
        messages, images = body.to_dicts(), body.image_urls()
        if len(images) > self.s.max_images_per_request:
            raise bad_request(
                f"{len(images)} images in the request; this server accepts at most "
                f"{self.s.max_images_per_request}",
                "messages",
                "too_many_images",
            )
        if images and self.provider is None:
            raise bad_request("this server does not accept images", "messages", "images_unsupported")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if images:
            seq = Sequence(
                rid, [], self._params(body, None), status=Status.WAITING_FOR_EMBEDDINGS, multimodal=True
            )
        else:
            try:
                text = self.pre.render(messages)
            except Exception as e:  # noqa: BLE001 - template errors are the request's fault
                raise bad_request(f"messages could not be rendered: {e}", "messages") from None
            ids = self.pre.tokenizer(text, add_special_tokens=False)["input_ids"]
            seq = Sequence(rid, ids, self._params(body, len(ids)))
        queue = await self._submit(seq, messages, images, body.requested_max_tokens(), request)
        return await self._respond(request, "chat", body, seq, queue)

    async def completion(self, request: Request, body: P.CompletionRequest) -> object:
        self._check_model(body)
        if isinstance(body.prompt, str):
            ids = self.pre.tokenizer(body.prompt, add_special_tokens=False)["input_ids"]
            if not ids:
                raise bad_request("prompt is empty", "prompt")
        else:
            ids = list(body.prompt)
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise bad_request(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
        params = self._params(body, len(ids))
        echo = ""
        if body.echo:
            echo = body.prompt if isinstance(body.prompt, str) else self.pre.tokenizer.decode(ids)
            params = replace(params, prompt_logprobs=params.logprobs)
        seq = Sequence(f"cmpl-{uuid.uuid4().hex}", ids, params)
        queue = await self._submit(seq, [], [], None)
        return await self._respond(request, "completions", body, seq, queue, echo, body.max_tokens != 0)

    # -- validation ---------------------------------------------------------------------------
    def _check_model(self, body: P._Sampling) -> None:
        """The request names this server's model and asks for nothing it does not do."""
        if body.model != self.s.model_name:
            raise APIError(
                404,
                f"model {body.model!r} does not exist; this server serves {self.s.model_name!r}",
                "model",
                "model_not_found",
            )
        refused = body.unsupported()
        if refused is not None:
            raise bad_request(refused[1], refused[0], "unsupported")

    def _params(self, body: P._Sampling, prompt_len: int | None) -> SamplingParams:
        asked = body.requested_max_tokens()
        max_tokens = asked or self.s.default_max_tokens
        if prompt_len is not None:
            max_tokens = self._fit(prompt_len, asked)
        if body.stop_token_ids and any(not 0 <= t < self.vocab_size for t in body.stop_token_ids):
            raise bad_request(f"stop_token_ids must be in [0, {self.vocab_size})", "stop_token_ids")
        stop = body.stop_list()
        if len(stop) > 16 or any(len(x) > 256 for x in stop):
            raise bad_request("at most 16 stop strings of at most 256 characters", "stop")
        k = body.logprobs_k()
        if k is not None and k > self.s.max_logprobs:
            param = "top_logprobs" if isinstance(body, P.ChatCompletionRequest) else "logprobs"
            raise bad_request(
                f"{param}={k} is more than this server's max_logprobs ({self.s.max_logprobs})", param
            )
        bias = body.bias()
        if any(not 0 <= t < self.vocab_size for t, _ in bias):
            raise bad_request(f"logit_bias token ids must be in [0, {self.vocab_size})", "logit_bias")
        if len(bias) > 1024:
            raise bad_request("logit_bias may name at most 1024 tokens", "logit_bias")
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            seed=body.seed,
            stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=k,
            repetition_penalty=body.repetition_penalty,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            logit_bias=bias,
        )

    def _fit(self, prompt_len: int, asked: int | None) -> int:
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise bad_request(
                f"the prompt has {prompt_len} tokens; this model's context is {self.max_model_len} tokens",
                "messages",
                "context_length_exceeded",
            )
        if asked is not None and asked > room:
            raise bad_request(
                f"max_tokens={asked} is too large: prompt ({prompt_len} tokens) + max_tokens "
                f"exceeds the context of {self.max_model_len}",
                "max_tokens",
                "context_length_exceeded",
            )
        return asked or min(self.s.default_max_tokens, room)

    # -- engine ------------------------------------------------------------------------------
    async def _submit(
        self, seq: Sequence, messages: list[dict], images: list[str], asked: int | None, request=None
    ) -> asyncio.Queue:
        st = self.engine.stats()
        if not self.engine.alive:
            raise APIError(503, "the engine is not running", code="engine_unavailable")
        if st["waiting"] + st["waiting_for_embeddings"] >= self.s.max_waiting_requests:
            raise APIError(429, "server overloaded: too many queued requests; retry later", code="overloaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        ended = asyncio.Event()  # the engine ended the request (a drain's end, an engine failure)

        def deliver(out: RequestOutput) -> None:
            queue.put_nowait(out)
            if out.finished:
                ended.set()

        self.engine.add(seq, lambda out: loop.call_soon_threadsafe(deliver, out))
        if not images:
            return queue
        try:
            inputs = await self._prepare(request, seq, messages, images, ended)
            if inputs is None:
                return queue  # its last output says why
        except BadMultimodalInput as e:
            self.engine.abort(seq.id)
            raise bad_request(str(e), "messages", "invalid_image") from None
        except (EncoderUnavailable, TimeoutError) as e:
            self.engine.abort(seq.id)
            raise APIError(503, f"image encoding unavailable: {e}", code="encoder_unavailable") from None
        except BaseException:
            self.engine.abort(seq.id)
            raise
        try:
            # safe: the engine reads params only after `inputs_ready` below
            seq.params = replace(seq.params, max_tokens=self._fit(inputs.num_tokens, asked))
        except APIError:
            inputs.release()
            self.engine.abort(seq.id)
            raise
        self.engine.inputs_ready(seq.id, inputs)
        return queue

    async def _prepare(
        self, request: Request, seq: Sequence, messages: list[dict], images: list[str], ended: asyncio.Event
    ):
        """The provider's rows for `images`; None if the engine ended the request meanwhile. Given up
        (the provider's finally aborts the rooms, the encode call ends with the task) if that happens
        or the client goes away."""
        prep = asyncio.ensure_future(
            asyncio.wait_for(self.provider.prepare(seq.id, messages, images), self.s.encode_timeout_s)
        )
        gone = asyncio.ensure_future(self._disconnected(request))
        over = asyncio.ensure_future(ended.wait())
        try:
            await asyncio.wait((prep, gone, over), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this task is cancelled
            for t in (gone, over, prep):
                if not t.done():
                    t.cancel()
        if prep.done() and not prep.cancelled():
            return prep.result()
        if over.done() and not over.cancelled():
            return None
        raise APIError(
            499, "the client disconnected while its images were encoded", code="aborted", type_="aborted"
        )

    async def _events(
        self, seq: Sequence, queue: asyncio.Queue, endpoint: str
    ) -> AsyncIterator[RequestOutput]:
        """Engine outputs of one request, with timing metrics; aborts the request if abandoned."""
        t0, first, last, done = seq.arrival, None, None, False
        try:
            while True:
                out: RequestOutput = await queue.get()
                now = time.monotonic()
                if out.token_ids:
                    if first is None:
                        first = now
                        self.metrics.ttft.observe(now - t0)
                    last = now
                if out.finished:
                    done = True
                    self.metrics.requests.labels(endpoint, out.finish_reason).inc()
                    self.metrics.prompt_tokens.inc(out.prompt_tokens)
                    self.metrics.generation_tokens.inc(out.completion_tokens)
                    self.metrics.e2e.observe(now - t0)
                    if first is not None and out.completion_tokens > 1:
                        self.metrics.tpot.observe((last - first) / (out.completion_tokens - 1))
                yield out
                if out.finished:
                    return
        finally:
            if not done:
                self.engine.abort(seq.id)
                self.metrics.aborted.inc()

    async def _respond(
        self, request: Request, endpoint: str, body, seq: Sequence, queue, echo: str = "", keep: bool = True
    ) -> object:
        """The request's answer: JSON, or SSE chunks if it streams; `echo` (completions) is the
        prompt text the answer starts with (with the prompt's logprobs if asked); without `keep` the
        generated token is left out (completions' max_tokens 0 with echo)."""
        events = self._events(seq, queue, endpoint)
        want_logprobs = body.logprobs_k() is not None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                self._sse(endpoint, seq.id, events, include_usage, want_logprobs, echo, seq.prompt_ids, keep),
                media_type="text/event-stream",
            )
        watcher = asyncio.create_task(self._watch_disconnect(request, seq.id))
        text, lps, plps, out = [], [], None, None
        try:
            async for out in events:
                text.append(out.text)
                lps.extend(out.logprobs)
                plps = out.prompt_logprobs if plps is None else plps
        finally:
            watcher.cancel()
            await events.aclose()
        if out.finish_reason == "error":
            raise APIError(out.error_status, out.error or "generation failed")
        if out.finish_reason == "abort":
            raise APIError(499, "request aborted", code="aborted", type_="aborted")
        chat = endpoint == "chat"
        if not keep:
            text, lps = [], []
        logprobs = None
        if want_logprobs and chat:
            logprobs = self.token_text.chat(lps)
        elif want_logprobs:
            logprobs = self.token_text.completion(lps, len(echo))
            if echo:
                logprobs = joined(self.token_text.prompt(seq.prompt_ids, plps or ()), logprobs)
        make = P.chat_response if chat else P.completion_response
        return JSONResponse(
            make(
                seq.id,
                self.s.model_name,
                echo + "".join(text),
                out.finish_reason,
                out.prompt_tokens,
                out.completion_tokens if keep else 0,
                logprobs,
            )
        )

    async def _watch_disconnect(self, request: Request, seq_id: str) -> None:
        await self._disconnected(request)
        self.engine.abort(seq_id)

    @staticmethod
    async def _disconnected(request: Request | None) -> None:
        """Returns once the client of `request` has gone (never, without a request)."""
        while True:
            await asyncio.sleep(0.25)
            if request is not None and await request.is_disconnected():
                return

    async def _sse(
        self,
        endpoint: str,
        rid: str,
        events,
        include_usage: bool,
        want_logprobs: bool,
        echo: str = "",
        prompt_ids: list[int] | None = None,
        keep: bool = True,
    ) -> AsyncIterator[str]:
        model, created = self.s.model_name, int(time.time())
        chat = endpoint == "chat"
        offset = len(echo)  # where the next tokens' text starts (completions' text_offset)

        def chunk(text: str, finish: str | None, delta: dict | None = None, lps=(), prompt=None) -> str:
            nonlocal offset
            logprobs = None
            if prompt is not None:  # the echoed prompt's own logprobs
                logprobs = self.token_text.prompt(prompt_ids, prompt)
            elif lps and chat:
                logprobs = self.token_text.chat(list(lps))
            elif lps:
                logprobs = self.token_text.completion(list(lps), offset)
                offset += sum(len(t) for t in logprobs["tokens"])
            c = (
                P.chat_chunk(
                    rid, model, created, delta if delta is not None else {"content": text}, finish, logprobs
                )
                if chat
                else P.completion_chunk(rid, model, created, text, finish, logprobs)
            )
            if include_usage:
                c["usage"] = None
            return f"data: {json.dumps(c)}\n\n"

        try:
            if chat:
                yield chunk("", None, {"role": "assistant", "content": ""})
            async for out in events:
                if out.finish_reason == "error":
                    err = APIError(out.error_status, out.error or "generation failed").body()
                    yield f"data: {json.dumps(err)}\n\n"
                    break
                if echo:  # first, with the prompt's logprobs, which come with the first token
                    yield chunk(echo, None, prompt=(out.prompt_logprobs or ()) if want_logprobs else None)
                    echo = ""
                lps = out.logprobs if want_logprobs and keep else ()
                if keep and (out.text or lps):
                    yield chunk(out.text, None, lps=lps)
                if out.finished:
                    yield chunk("", out.finish_reason, {} if chat else None)
                    if include_usage:
                        c = (P.chat_chunk if chat else P.completion_chunk)(
                            rid, model, created, {} if chat else "", None
                        )
                        done = out.completion_tokens if keep else 0
                        c["choices"], c["usage"] = [], P.usage(out.prompt_tokens, done)
                        yield f"data: {json.dumps(c)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()
