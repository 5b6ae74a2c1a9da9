"""The OpenAI endpoints' logic: request -> prompts + sampling params -> engine sequences -> answer.

Each choice of a request (`n`, several completion prompts) is one engine sequence. Text prompts are
tokenised here; image prompts are handed to the `MultimodalProvider` (once per request) while the
sequences already sit in the scheduler as waiting-for-embeddings. A client that goes away aborts
every choice (the engine frees their KV blocks and vision rows). The JSON body or SSE stream is
assembled in `responses.py`; HTTP plumbing lives in `app.py`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from language_server.api import protocol as P
from language_server.api.errors import APIError, bad_request
from language_server.api.logprobs import TokenText
from language_server.api.metrics import Metrics
from language_server.api.responses import Answer, Choice
from language_server.api.tools import with_tools
from language_server.engine.engine import Engine, RequestOutput
from language_server.engine.grammar import GrammarError
from language_server.engine.sequence import SamplingParams, Sequence, Status
from language_server.mm.base import (
    BadMultimodalInput,
    EncoderUnavailable,
    MultimodalInputs,
    MultimodalProvider,
)


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
        grammars=None,
    ) -> None:
        self.s, self.engine, self.pre, self.provider = settings, engine, preprocessor, provider
        self.grammars = grammars  # engine/grammar.py Grammars (structured output), None: refused
        self.metrics, self.max_model_len, self.vocab_size = metrics, max_model_len, vocab_size
        self.token_text = TokenText(preprocessor.tokenizer)

    # -- endpoints ----------------------------------------------------------------------------
    async def chat(self, request: Request, body: P.ChatCompletionRequest) -> object:
        self._check_model(body)
        tools = body.tool_dicts()
        messages, images = with_tools(body.to_dicts(), tools), body.image_urls()
        if len(images) > self.s.max_images_per_request:
            raise bad_request(
                f"{len(images)} images in the request; this server accepts at most "
                f"{self.s.max_images_per_request}",
                "messages",
                "too_many_images",
            )
        if images and self.provider is None:
            raise bad_request("this server does not accept images", "messages", "images_unsupported")
        self._check_choices(body.n)
        grammar = await self._grammar(body)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        if images:
            params = replace(self._params(body, None), grammar=grammar)
            seqs = [
                Sequence(
                    self._seq_id(rid, j, body.n),
                    [],
                    self._seeded(params, j),
                    multimodal=True,
                    status=Status.WAITING_FOR_EMBEDDINGS,
                )
                for j in range(body.n)
            ]
        else:
            try:
                text = self.pre.render(messages)
            except Exception as e:  # noqa: BLE001 - template errors are the request's fault
                raise bad_request(f"messages could not be rendered: {e}", "messages") from None
            ids = self.pre.tokenizer(text, add_special_tokens=False)["input_ids"]
            params = replace(self._params(body, len(ids)), grammar=grammar)
            seqs = [
                Sequence(self._seq_id(rid, j, body.n), ids, self._seeded(params, j)) for j in range(body.n)
            ]
        choices = [
            Choice(j, s.prompt_ids, counts_prompt=j == 0, tools=bool(tools)) for j, s in enumerate(seqs)
        ]
        queue = await self._submit(seqs, messages, images, body.requested_max_tokens(), request)
        return await self._respond(request, "chat", body, rid, seqs, choices, queue)

    async def completion(self, request: Request, body: P.CompletionRequest) -> object:
        self._check_model(body)
        prompts = body.prompts()
        self._check_choices(len(prompts) * body.n)
        rid = f"cmpl-{uuid.uuid4().hex}"
        seqs, choices = [], []
        for p in prompts:
            ids = (
                self.pre.tokenizer(p, add_special_tokens=False)["input_ids"]
                if isinstance(p, str)
                else list(p)
            )
            if not ids:
                raise bad_request("prompt is empty", "prompt")
            if any(not 0 <= t < self.vocab_size for t in ids):
                raise bad_request(f"prompt token ids must be in [0, {self.vocab_size})", "prompt")
            params = self._params(body, len(ids))
            echo = ""
            if body.echo:
                echo = p if isinstance(p, str) else self.pre.tokenizer.decode(ids)
                params = replace(params, prompt_logprobs=params.logprobs)
            for j in range(body.n):
                i = len(seqs)
                seqs.append(
                    Sequence(self._seq_id(rid, i, len(prompts) * body.n), ids, self._seeded(params, j))
                )
                choices.append(Choice(i, ids, echo, body.max_tokens != 0, counts_prompt=j == 0))
        queue = await self._submit(seqs, [], [], None)
        return await self._respond(request, "completions", body, rid, seqs, choices, queue)

    def tokenize(self, body: P.TokenizeRequest) -> dict:
        self.check_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("give either prompt or messages", "prompt")
        if body.messages is not None:
            if not body.messages:
                raise bad_request("messages is empty", "messages")
            try:
                messages = with_tools(body.to_dicts(), None)  # tool turns as a chat request renders them
                text = self.pre.render(messages, add_generation_prompt=body.add_generation_prompt)
            except Exception as e:  # noqa: BLE001 - template errors are the request's fault
                raise bad_request(f"messages could not be rendered: {e}", "messages") from None
        else:
            text = body.prompt
        ids = self.pre.tokenizer(text, add_special_tokens=False)["input_ids"]
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def detokenize(self, body: P.DetokenizeRequest) -> dict:
        self.check_name(body.model)
        if any(not 0 <= t < self.vocab_size for t in body.tokens):
            raise bad_request(f"token ids must be in [0, {self.vocab_size})", "tokens")
        return {"prompt": self.pre.tokenizer.decode(body.tokens)}

    # -- validation ---------------------------------------------------------------------------
    def check_name(self, model: str) -> None:
        if model != self.s.model_name:
            raise APIError(
                404,
                f"model {model!r} does not exist; this server serves {self.s.model_name!r}",
                "model",
                "model_not_found",
            )

    def _check_model(self, body: P._Sampling) -> None:
        """The request names this server's model and asks for nothing it does not do."""
        self.check_name(body.model)
        refused = body.unsupported()
        if refused is not None:
            raise bad_request(refused[1], refused[0], "unsupported")

    async def _grammar(self, body: P.ChatCompletionRequest) -> str | None:
        """The answer's grammar (response_format, or a forced tool_choice) as a spec, compiled once
        here (off the event loop) so that a schema the grammar engine cannot take is this request's
        400."""
        spec = body.grammar_spec()
        if spec is None:
            return None
        param = body.grammar_param
        if self.grammars is None or not self.grammars.available():
            raise bad_request(
                f"{param} needs constrained decoding (xgrammar), which this server does not have",
                param,
                "unsupported",
            )
        if body.min_tokens:
            raise bad_request(f"min_tokens cannot be combined with a constrained {param}", "min_tokens")
        try:
            await asyncio.to_thread(self.grammars.compile, spec)
        except GrammarError as e:
            raise bad_request(f"{param}: {e}", param) from None
        return spec

    def _check_choices(self, n: int) -> None:
        if n > self.s.max_choices_per_request:
            raise bad_request(
                f"{n} choices (n x prompts) in one request; this server answers at most "
                f"{self.s.max_choices_per_request}",
                "n",
            )

    @staticmethod
    def _seq_id(rid: str, i: int, n: int) -> str:
        return rid if n == 1 else f"{rid}-{i}"

    @staticmethod
    def _seeded(params: SamplingParams, j: int) -> SamplingParams:
        """Choice j of a seeded request draws from seed + j: the n choices differ, and each is
        reproducible."""
        return params if params.seed is None or j == 0 else replace(params, seed=params.seed + j)

    def _params(self, body: P._Sampling, prompt_len: int | None) -> SamplingParams:
        asked = body.requested_max_tokens()
        max_tokens = asked or self.s.default_max_tokens
        if prompt_len is not None:
            max_tokens = self._fit(
                prompt_len, asked, "prompt" if isinstance(body, P.CompletionRequest) else "messages"
            )
        if body.stop_token_ids and any(not 0 <= t < self.vocab_size for t in body.stop_token_ids):
            raise bad_request(f"stop_token_ids must be in [0, {self.vocab_size})", "stop_token_ids")
        stop = body.stop_list()
        if len(stop) > 16 or any(len(x) > 256 for x in stop):
            raise bad_request("at most 16 stop strings of at most 256 characters", "stop")
        if body.min_tokens > max_tokens:
            raise bad_request(f"min_tokens={body.min_tokens} exceeds max_tokens={max_tokens}", "min_tokens")
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
            min_tokens=body.min_tokens,
            logprobs=k,
            repetition_penalty=body.repetition_penalty,
            frequency_penalty=body.frequency_penalty,
            presence_penalty=body.presence_penalty,
            logit_bias=bias,
        )

    def _fit(self, prompt_len: int, asked: int | None, param: str = "messages") -> int:
        room = self.max_model_len - prompt_len
        if room <= 0:
            raise bad_request(
                f"the prompt has {prompt_len} tokens; this model's context is {self.max_model_len} tokens",
                param,
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
        self, seqs: list[Sequence], messages: list[dict], images: list[str], asked: int | None, request=None
    ) -> asyncio.Queue:
        """Hand the request's sequences (one per choice) to the engine; with images, encode them once
        and give every choice its rows (the first the received buffer, the others a copy). Returns
        the queue their outputs arrive on, as (choice index, RequestOutput)."""
        st = self.engine.stats()
        if not self.engine.alive:
            raise APIError(503, "the engine is not running", code="engine_unavailable")
        if st["waiting"] + st["waiting_for_embeddings"] + len(seqs) > self.s.max_waiting_requests:
            raise APIError(429, "server overloaded: too many queued requests; retry later", code="overloaded")
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        ended = asyncio.Event()  # the engine ended a choice (a drain's end, an engine failure)

        def deliver(i: int, out: RequestOutput) -> None:
            queue.put_nowait((i, out))
            if out.finished:
                ended.set()

        for i, seq in enumerate(seqs):
            self.engine.add(seq, lambda out, i=i: loop.call_soon_threadsafe(deliver, i, out))
        if not images:
            return queue
        try:
            inputs = await self._prepare(request, seqs[0].id, messages, images, ended)
            if inputs is None:
                self._abort(seqs)  # the engine ended one: the others cannot go on alone
                return queue  # the last outputs say why
        except BadMultimodalInput as e:
            self._abort(seqs)
            raise bad_request(str(e), "messages", "invalid_image") from None
        except (EncoderUnavailable, TimeoutError) as e:
            self._abort(seqs)
            raise APIError(503, f"image encoding unavailable: {e}", code="encoder_unavailable") from None
        except BaseException:
            self._abort(seqs)
            raise
        try:
            max_tokens = self._fit(inputs.num_tokens, asked)
        except APIError:
            inputs.release()
            self._abort(seqs)
            raise
        # the copies before the engine has the buffer: it frees it once the first prefill read it
        rows = [inputs] + [_copy(inputs) for _ in seqs[1:]]
        for seq, own in zip(seqs, rows, strict=True):
            # safe: the engine reads params only after `inputs_ready` below
            seq.params = replace(seq.params, max_tokens=max_tokens)
            self.engine.inputs_ready(seq.id, own)
        return queue

    def _abort(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            self.engine.abort(seq.id)

    async def _prepare(
        self, request: Request, rid: str, messages: list[dict], images: list[str], ended: asyncio.Event
    ):
        """The provider's rows for `images`; None if the engine ended the request meanwhile. Given up
        (the provider's finally aborts the rooms, the encode call ends with the task) if that happens
        or the client goes away."""
        prep = asyncio.ensure_future(
            asyncio.wait_for(self.provider.prepare(rid, messages, images), self.s.encode_timeout_s)
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
        self, seqs: list[Sequence], queue: asyncio.Queue, endpoint: str
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(choice index, engine output) of one request until every choice finished, with timing
        metrics per choice; aborts the unfinished ones if abandoned."""
        t0 = seqs[0].arrival
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        done: set[int] = set()
        try:
            while len(done) < len(seqs):
                i, out = await queue.get()
                now = time.monotonic()
                if out.token_ids:
                    if i not in first:
                        first[i] = now
                        self.metrics.ttft.observe(now - t0)
                    last[i] = now
                if out.finished:
                    done.add(i)
                    self.metrics.requests.labels(endpoint, out.finish_reason).inc()
                    self.metrics.prompt_tokens.inc(out.prompt_tokens)
                    self.metrics.generation_tokens.inc(out.completion_tokens)
                    self.metrics.e2e.observe(now - t0)
                    if i in first and out.completion_tokens > 1:
                        self.metrics.tpot.observe((last[i] - first[i]) / (out.completion_tokens - 1))
                yield i, out
        finally:
            left = [s for i, s in enumerate(seqs) if i not in done]
            if left:
                self._abort(left)
                self.metrics.aborted.inc(len(left))

    async def _respond(
        self, request: Request, endpoint: str, body, rid: str, seqs: list[Sequence], choices, queue
    ) -> object:
        """The request's answer: JSON, or SSE chunks if it streams."""
        events = self._events(seqs, queue, endpoint)
        include_usage = bool(body.stream and body.stream_options and body.stream_options.include_usage)
        answer = Answer(
            endpoint == "chat",
            rid,
            self.s.model_name,
            choices,
            self.token_text,
            body.logprobs_k() is not None,
            include_usage,
        )
        if body.stream:
            return StreamingResponse(answer.sse(events), media_type="text/event-stream")
        watcher = asyncio.create_task(self._watch_disconnect(request, seqs))
        try:
            return JSONResponse(await answer.json(events))
        finally:
            watcher.cancel()
            await events.aclose()

    async def _watch_disconnect(self, request: Request, seqs: list[Sequence]) -> None:
        await self._disconnected(request)
        self._abort(seqs)

    @staticmethod
    async def _disconnected(request: Request | None) -> None:
        """Returns once the client of `request` has gone (never, without a request)."""
        while True:
            await asyncio.sleep(0.25)
            if request is not None and await request.is_disconnected():
                return


def _copy(inputs: MultimodalInputs) -> MultimodalInputs:
    """Another choice's own rows (the received buffer goes with the first choice only)."""
    return MultimodalInputs(
        inputs.fill_ids,
        inputs.positions,
        inputs.mrope_delta,
        inputs.embeddings.clone(),
        inputs.deepstack.clone(),
    )
