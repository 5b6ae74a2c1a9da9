"""Encoder pool logic (no real encoders): least-loaded choice, retries, rejection, health rotation,
giving up the calls of an encoder that stalled."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from encode_server.protocol import CONTENT_TYPE, EncodeRequest, EncodeResponse, encode
from language_server.mm.encoder_pool import EncodeRejected, EncoderPool, EncoderUnavailable


def _transport(
    behaviour: dict[str, str], calls: list[str], probes: list[str] | None = None, probe_wait_s=0.0
):
    """behaviour: host -> 'ok' | 'error' | 'bad_request' | 'overloaded' | 'down' | 'unhealthy' | 'hung'
    | 'wedged' (a hung process: every call waits forever, the probes time out) | 'draining' (refuses
    new connections, the probes among them, and answers the calls it holds after 0.5 s)."""

    async def handler(request: httpx.Request) -> httpx.Response:
        host = f"{request.url.scheme}://{request.url.host}:{request.url.port}"
        mode = behaviour[host]
        if probes is not None and request.url.path == "/health":
            probes.append(host)
        if mode == "wedged":
            if request.url.path == "/health":
                if probe_wait_s:  # as the client's timeout would end it (a mock transport has none)
                    await asyncio.sleep(probe_wait_s)
                raise httpx.ReadTimeout("no answer", request=request)
            calls.append(host)
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                calls.append(host + " cancelled")
                raise
        if mode == "draining":
            if request.url.path == "/health":
                raise httpx.ConnectError("connection refused", request=request)
            await asyncio.sleep(0.5)
            mode = "ok"
        if mode == "down":
            raise httpx.ConnectError("connection refused", request=request)
        if mode == "hung" and request.url.path != "/health":
            calls.append(host)
            raise httpx.ReadTimeout("no answer", request=request)
        if request.url.path == "/health":
            return httpx.Response(503 if mode == "unhealthy" else 200, json={})
        calls.append(host)
        status = "ok" if mode == "unhealthy" else mode
        body = encode(EncodeResponse(room="r", status=status, message=f"{mode} from {host}"))
        return httpx.Response(200, content=body, headers={"content-type": CONTENT_TYPE})

    return httpx.MockTransport(handler)


A, B, C = "http://a:1", "http://b:1", "http://c:1"


def _run(behaviour, fn, probes=None, probe_wait_s=0.0, **options):
    calls: list[str] = []
    failed: list[str] = []

    async def main():
        transport = _transport(behaviour, calls, probes, probe_wait_s)
        pool = EncoderPool(list(behaviour), transport=transport, max_attempts=3, **options)

        async def make(attempt):
            return EncodeRequest(room=f"room-{attempt}", messages=[], descriptor={})

        async def on_fail(req, writer_gone):
            # "?" marks an attempt whose encoder may still write (no answer, not refused)
            failed.append(req.room if writer_gone else req.room + "?")

        try:
            return pool, await fn(pool, make, on_fail)
        finally:
            await pool.close()

    pool, result = asyncio.run(main())
    return pool, result, calls, failed


def test_failed_encoder_is_retried_elsewhere_and_leaves_rotation():
    pool, resp, calls, failed = _run({A: "error", B: "ok"}, lambda p, m, f: _first_a(p, m, f))
    assert resp.status == "ok" and calls == [A, B] and failed == ["room-0"]
    assert not pool.encoders[A].healthy and pool.encoders[B].served == 1


async def _first_a(pool, make, on_fail):
    pool._rr = -1  # make A the first pick among equals
    return await pool.encode(make, on_fail)


def test_bad_request_is_not_retried():
    calls = []

    async def fn(pool, make, on_fail):
        pool._rr = -1  # A first
        try:
            await pool.encode(make, on_fail)
        except EncodeRejected as e:
            calls.append(str(e))
        return None

    _, _, posted, failed = _run({A: "bad_request", B: "ok"}, fn)
    assert calls == ["bad_request from http://a:1"] and posted == [A] and failed == ["room-0"]


def test_all_failing_gives_unavailable_after_bounded_attempts():
    with pytest.raises(EncoderUnavailable, match="no encode server could take the request"):
        _run({A: "down", B: "error", C: "overloaded"}, lambda p, m, f: p.encode(m, f))


def test_probe_removes_and_restores():
    behaviour = {A: "unhealthy", B: "ok"}

    async def fn(pool, make, on_fail):
        await pool.probe_all()
        assert [e.url for e in pool.healthy()] == [B]
        behaviour[A] = "ok"
        await pool.probe_all()
        return [e.url for e in pool.healthy()]

    _, healthy, _, _ = _run(behaviour, fn)
    assert healthy == [A, B]


def test_least_loaded_is_picked():
    async def fn(pool, make, on_fail):
        pool.encoders[A].inflight = 3
        return pool.pick().url

    _, url, _, _ = _run({A: "ok", B: "ok"}, fn)
    assert url == B


def test_no_encoders_at_all():
    with pytest.raises(EncoderUnavailable, match="no healthy encode server"):
        _run({}, lambda p, m, f: p.encode(m, f))


def test_writer_gone_only_when_the_encoder_answered_or_was_unreachable():
    """A timed-out attempt's encoder may still write into its room (the receiver must keep the
    blocks until it reports back); an answered or refused one cannot."""
    _, resp, calls, failed = _run({A: "hung", B: "down", C: "ok"}, lambda p, m, f: _first_a(p, m, f))
    assert resp.status == "ok" and calls[0] == A and "room-0?" in failed
    _, resp, calls, failed = _run({A: "overloaded", B: "ok"}, lambda p, m, f: _first_a(p, m, f))
    assert resp.status == "ok" and failed == ["room-0"]


async def _encode_while_probing(pool, make, on_fail, limit_s: float = 10.0):
    """A first; the health probes run every 50 ms meanwhile (as the pool's loop does)."""
    pool.health_interval_s = 0.05
    pool._rr = -1
    pool._task = asyncio.create_task(pool._probe_loop())
    try:
        return await asyncio.wait_for(pool.encode(make, on_fail), limit_s)
    except TimeoutError:
        return "still waiting"


def test_the_calls_of_an_encoder_that_stalled_are_given_up_and_retried():
    """A hung encoder process keeps its connections open: once it failed `stalled_probes` probes in
    a row, the call it holds is cancelled and retried on another encoder (its room kept: it may
    still write), not left waiting for the encode deadline."""
    pool, resp, calls, failed = _run({A: "wedged", B: "ok"}, _encode_while_probing, stalled_probes=2)
    assert resp.status == "ok" and calls == [A, A + " cancelled", B] and failed == ["room-0?"]
    assert not pool.encoders[A].healthy and pool.encoders[A].failures == 1
    assert "stopped answering health probes" in pool.encoders[A].last_error
    # 0: only new requests avoid it; the call stays with the encoder that holds it
    _, resp, calls, failed = _run(
        {A: "wedged", B: "ok"}, lambda p, m, f: _encode_while_probing(p, m, f, 1.0), stalled_probes=0
    )
    assert resp == "still waiting" and calls[0] == A and failed == []


def test_refused_probes_leave_the_calls_an_encoder_holds_alone():
    """A draining encoder (SIGTERM: no new connections) finishes what it holds; a dead one's calls
    end by themselves (reset). Only probes that connected and got no answer mean hung."""
    pool, resp, calls, failed = _run({A: "draining", B: "ok"}, _encode_while_probing, stalled_probes=2)
    assert resp.status == "ok" and calls == [A] and failed == []
    assert pool.encoders[A].silent_probes == 0 and not pool.encoders[A].healthy


def test_an_encoder_that_answers_probes_again_keeps_its_calls():
    behaviour = {A: "wedged", B: "ok"}

    async def fn(pool, make, on_fail):
        for _ in range(2):
            await pool.probe_all()
        assert pool.encoders[A].stalled.is_set()
        behaviour[A] = "ok"
        await pool.probe_all()
        assert pool.encoders[A].healthy and not pool.encoders[A].stalled.is_set()
        pool._rr = -1
        return await pool.encode(make, on_fail)

    pool, resp, calls, failed = _run(behaviour, fn)
    assert resp.status == "ok" and calls == [A] and failed == [] and pool.encoders[A].served == 1


def test_a_cancelled_caller_cancels_its_call():
    async def fn(pool, make, on_fail):
        pool._rr = -1
        task = asyncio.create_task(pool.encode(make, on_fail))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)  # the call's own task takes its cancellation
        return pool.encoders[A].inflight

    _, inflight, calls, _ = _run({A: "wedged"}, fn)
    assert calls == [A, A + " cancelled"] and inflight == 0


def test_a_hung_encoder_does_not_hold_up_the_probes_of_the_others():
    probes: list[str] = []

    async def fn(pool, make, on_fail):
        pool.health_interval_s = 0.05
        pool._task = asyncio.create_task(pool._probe_loop())
        await asyncio.sleep(1.2)  # A's probes each wait out the 1 s timeout meanwhile
        return None

    _run({A: "wedged", B: "ok"}, fn, probes=probes, probe_wait_s=1.0)
    assert probes.count(A) <= 2 and probes.count(B) >= 8, (probes.count(A), probes.count(B))
