"""The language server's view of its encode servers: who is healthy, who is least loaded, and the
bounded retry of one encode call across them.

Encoders come from a static list and may be added or removed at run time (discovery plugs in via
`set_urls`). A background task probes `GET /health`; an encoder that fails a call or a probe leaves
the rotation until a probe succeeds again, and one whose probes time out `stalled_probes` times in a
row is given up for the calls it holds too (retried elsewhere): a process that hangs, stopped or
deadlocked, keeps its connections open, so nothing else would end them before the encode deadline
(a refused probe does not count: a dead process resets its calls itself, a draining one still
serves them). It knows nothing of buffers or rooms: the caller passes a function that builds the
request for an attempt.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx

from encode_server.protocol import CONTENT_TYPE, EncodeRequest, EncodeResponse, decode_response, encode
from language_server.mm.base import EncoderUnavailable  # noqa: F401 - one type across providers
from transfer.config import dead_peer_tcp

log = logging.getLogger(__name__)


class EncodeRejected(ValueError):
    """An encoder judged the request itself bad (-> 400); retrying elsewhere would not help."""


class EncoderStalled(RuntimeError):
    """The encoder holding a call stopped answering health probes; the call was given up."""


@dataclass
class EncoderState:
    url: str
    healthy: bool = True  # optimistic until the first probe says otherwise
    inflight: int = 0
    served: int = 0
    failures: int = 0
    last_error: str = ""
    last_probe: float = field(default=0.0)
    silent_probes: int = 0  # probes in a row that timed out (connected, no answer)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)  # set: give up the calls it holds


class EncoderPool:
    def __init__(
        self,
        urls: list[str],
        timeout_s: float = 60.0,
        health_interval_s: float = 2.0,
        max_attempts: int = 3,
        probe_timeout_s: float = 5.0,
        transport: httpx.AsyncBaseTransport | None = None,
        link_timeout_s: float = 10.0,
        stalled_probes: int = 2,
    ) -> None:
        self.encoders: dict[str, EncoderState] = {}
        self.set_urls(urls)
        self.timeout_s, self.health_interval_s, self.max_attempts = timeout_s, health_interval_s, max_attempts
        self.probe_timeout_s, self.stalled_probes = probe_timeout_s, stalled_probes
        # idle connections expire before uvicorn's 5 s keep-alive closes them (else a reused one races);
        # an encoder whose host stops answering mid-request ends its connection after link_timeout_s
        # (the attempt fails and is retried elsewhere) instead of holding the request to its deadline
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=2.0),
            transport=transport
            or httpx.AsyncHTTPTransport(
                limits=httpx.Limits(keepalive_expiry=2.0), socket_options=_dead_peer_options(link_timeout_s)
            ),
        )
        self._task: asyncio.Task | None = None
        self._rr = 0

    def set_urls(self, urls: list[str]) -> None:
        urls = [u.rstrip("/") for u in urls if u]
        for u in urls:
            self.encoders.setdefault(u, EncoderState(u))
        for u in list(self.encoders):
            if u not in urls:
                del self.encoders[u]

    def healthy(self) -> list[EncoderState]:
        return [e for e in self.encoders.values() if e.healthy]

    def pick(self, exclude: set[str] = frozenset()) -> EncoderState | None:
        live = [e for e in self.healthy() if e.url not in exclude]
        if not live:
            return None
        least = min(e.inflight for e in live)
        tied = [e for e in live if e.inflight == least]
        self._rr += 1
        return tied[self._rr % len(tied)]

    async def start(self) -> None:
        await self.probe_all()
        self._task = asyncio.create_task(self._probe_loop())

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
        await self._client.aclose()

    async def _probe_loop(self) -> None:
        """Every `health_interval_s`, probe each encoder whose previous probe has ended: one that
        hangs (its probe waits out `probe_timeout_s`) does not hold up the probes of the others."""
        probing: dict[str, asyncio.Task] = {}
        try:
            while True:
                await asyncio.sleep(self.health_interval_s)
                for url in [u for u, t in probing.items() if t.done() and u not in self.encoders]:
                    del probing[url]
                for e in list(self.encoders.values()):
                    if e.url not in probing or probing[e.url].done():
                        probing[e.url] = asyncio.create_task(self._probe_logged(e))
        finally:
            for t in probing.values():
                t.cancel()

    async def _probe_logged(self, e: EncoderState) -> None:
        try:
            await self._probe(e)
        except Exception:  # noqa: BLE001 - the probes must survive anything
            log.exception("encoder health probe of %s", e.url)

    async def probe_all(self) -> None:
        await asyncio.gather(*(self._probe(e) for e in list(self.encoders.values())))

    async def _probe(self, e: EncoderState) -> None:
        silent = False
        try:
            r = await self._client.get(f"{e.url}/health", timeout=self.probe_timeout_s)
            ok = r.status_code == 200
            err = "" if ok else f"health returned {r.status_code}"
        except httpx.HTTPError as exc:
            ok, err = False, f"{type(exc).__name__}: {exc}"
            silent = isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout)
        if ok != e.healthy:
            log.warning(
                "encoder %s is now %s%s", e.url, "healthy" if ok else "unhealthy", f" ({err})" if err else ""
            )
        e.healthy, e.last_probe = ok, time.monotonic()
        e.silent_probes = e.silent_probes + 1 if silent else 0
        if err:
            e.last_error = err
        if not silent and e.stalled.is_set():
            e.stalled = asyncio.Event()  # calls from now on may wait for it again
        elif 0 < self.stalled_probes <= e.silent_probes and not e.stalled.is_set():
            if e.inflight:
                log.warning(
                    "encoder %s left %d health probes in a row unanswered: giving up the %d requests "
                    "it holds",
                    e.url,
                    e.silent_probes,
                    e.inflight,
                )
            e.stalled.set()

    async def encode(
        self,
        make_request: Callable[[int], Awaitable[EncodeRequest]],
        on_failed_attempt: Callable[[EncodeRequest, bool], Awaitable[None]],
    ) -> EncodeResponse:
        """Try healthy encoders (least loaded first) up to `max_attempts` times.

        `make_request(attempt)` builds a fresh request (fresh room) per attempt;
        `on_failed_attempt(req, writer_gone)` releases what that attempt held before the next one
        starts; `writer_gone` is True when the encoder can no longer write into the room (it answered,
        or the connection was refused so it never got the request).
        """
        tried: set[str] = set()
        errors: list[str] = []
        for attempt in range(self.max_attempts):
            enc = self.pick(exclude=tried) or self.pick()
            if enc is None:
                break
            tried.add(enc.url)
            req = await make_request(attempt)
            timed_out = writer_gone = False
            enc.inflight += 1
            try:
                resp = await self._post_unless_stalled(enc, req)
            except (httpx.HTTPError, ValueError, EncoderStalled) as exc:
                resp, err = None, f"{enc.url}: {type(exc).__name__}: {exc}"
                timed_out = isinstance(exc, httpx.TimeoutException)
                writer_gone = isinstance(exc, httpx.ConnectError)
            finally:
                enc.inflight -= 1
            if resp is not None and resp.status == "ok":
                enc.served += 1
                return resp
            writer_gone = writer_gone or resp is not None
            if resp is not None and resp.status == "bad_request":
                await on_failed_attempt(req, writer_gone)
                raise EncodeRejected(resp.message)
            if resp is not None:
                err = f"{enc.url}: {resp.status}: {resp.message}"
            errors.append(err)
            enc.failures += 1
            enc.last_error = err
            # a timeout means busy, not dead (the probe decides); "transfer_failed" may be our side
            if resp is None and not timed_out or resp is not None and resp.status == "error":
                enc.healthy = False  # out of rotation until a probe says otherwise
            log.warning(
                "encode attempt %d failed (%s); %s",
                attempt + 1,
                err,
                "retrying" if attempt + 1 < self.max_attempts else "giving up",
            )
            await on_failed_attempt(req, writer_gone)
        detail = "; ".join(errors) if errors else "no healthy encode server"
        raise EncoderUnavailable(f"no encode server could take the request: {detail}")

    async def _post_unless_stalled(self, enc: EncoderState, req: EncodeRequest) -> EncodeResponse:
        """`_post`, given up (EncoderStalled) if the encoder stalls meanwhile (see `_probe`)."""
        post = asyncio.ensure_future(self._post(enc, req))
        stalled = asyncio.ensure_future(enc.stalled.wait())
        try:
            done, _ = await asyncio.wait((post, stalled), return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when the caller is cancelled: never leave the call running
            stalled.cancel()
            if not post.done():
                post.cancel()
        if post not in done:
            raise EncoderStalled(f"stopped answering health probes ({enc.last_error})")
        return post.result()

    async def _post(self, enc: EncoderState, req: EncodeRequest) -> EncodeResponse:
        r = await self._client.post(
            f"{enc.url}/v1/encode",
            content=encode(req),
            headers={"content-type": CONTENT_TYPE},
            timeout=req.deadline_s + 1,  # past its deadline the encoder has given up the room too
        )
        if r.headers.get("content-type", "").startswith(CONTENT_TYPE):
            return decode_response(r.content)
        raise ValueError(f"unexpected reply HTTP {r.status_code}: {r.text[:200]}")

    def snapshot(self) -> list[dict]:
        return [
            {
                "url": e.url,
                "healthy": e.healthy,
                "inflight": e.inflight,
                "served": e.served,
                "failures": e.failures,
                "last_error": e.last_error,
            }
            for e in self.encoders.values()
        ]


def _dead_peer_options(link_timeout_s: float) -> list[tuple[int, int, int]] | None:
    """Socket options that end a connection to a silent peer after about `link_timeout_s` (Linux)."""
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)
    if link_timeout_s <= 0 or user_timeout is None:
        return None
    idle, interval, probes, user_timeout_ms = dead_peer_tcp(link_timeout_s)
    return [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle),
        (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval),
        (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, probes),
        (socket.IPPROTO_TCP, user_timeout, user_timeout_ms),
    ]
