"""A language server told to stop (SIGTERM, as Kubernetes does) drains: it takes no new
connections, the requests in flight finish within `shutdown_grace_s`, and those still running after
it end with a 503 (a stream gets an error event) rather than a cut connection. Real process, real
openai client, the tiny checkpoint."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import language, openai_client

pytestmark = pytest.mark.slow
LONG = dict(max_tokens=1200, temperature=0, extra_body={"ignore_eos": True})  # 4-10 s of decode here


def _stream_then_terminate(server, **create):
    """Start a stream, SIGTERM the server once its first text arrived, read the stream to its end;
    returns (finish_reason, completion tokens, error or None, seconds from SIGTERM to the end)."""
    client = openai_client(server.url).with_options(timeout=120, max_retries=0)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count."}],
        stream=True,
        stream_options={"include_usage": True},
        **create,
    )
    finish, tokens, error, sent = None, None, None, None
    try:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
            if sent is None and chunk.choices and chunk.choices[0].delta.content:
                os.kill(server.proc.pid, signal.SIGTERM)
                sent = time.monotonic()
    except openai.APIError as e:
        error = e
    return finish, tokens, error, time.monotonic() - sent


def _lasting(server, seconds: float) -> dict:
    """LONG, with max_tokens for about `seconds` of decode on this machine today (timed on a short
    request first): a fixed count outlasted 5 s on a busy day and did not on a quiet one."""
    client = openai_client(server.url).with_options(timeout=120, max_retries=0)
    t = time.monotonic()
    client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Count."}], **{**LONG, "max_tokens": 200}
    )
    per_token = (time.monotonic() - t) / 200
    return {**LONG, "max_tokens": min(4000, int(seconds / per_token))}  # the server's --max-model-len 4096


def _refused(server) -> bool:
    try:
        httpx.get(server.url + "/ready", timeout=5)
    except httpx.ConnectError:
        return True
    return False


def test_a_stream_in_flight_finishes_after_sigterm_and_new_connections_are_refused(tiny_model_dir, tmp_path):
    server = language(
        tiny_model_dir, tmp_path, "lang", "--shutdown-grace-s", "60", "--max-model-len", "4096"
    ).wait_healthy()
    try:
        refused = []
        t = threading.Timer(1.0, lambda: refused.append(_refused(server)))
        long = _lasting(server, 12)
        t.start()  # while the stream still runs
        finish, tokens, error, after = _stream_then_terminate(server, **long)
        t.join()
        assert error is None and finish == "length" and tokens == long["max_tokens"], (error, finish, tokens)
        assert after > 5, after  # the old fixed 5 s would have cut it: the test must outlast that
        assert refused == [True]
        server.proc.wait(20)  # and then it exits by itself
    finally:
        server.stop()


def test_requests_still_running_when_the_grace_ends_get_a_503(tiny_model_dir, tmp_path):
    server = language(tiny_model_dir, tmp_path, "lang", "--shutdown-grace-s", "1").wait_healthy()
    try:
        plain: dict = {}

        def non_stream():
            c = openai_client(server.url).with_options(timeout=120, max_retries=0)
            try:
                c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Go."}], **LONG)
            except openai.APIStatusError as e:
                plain.update(status=e.status_code, message=e.message)

        t = threading.Thread(target=non_stream)
        t.start()
        end = time.monotonic() + 30  # it runs before the stream (and the SIGTERM) starts
        while httpx.get(server.url + "/debug/engine", timeout=5).json()["running"] < 1:
            assert time.monotonic() < end and t.is_alive(), plain
            time.sleep(0.05)
        finish, _, error, after = _stream_then_terminate(server, **LONG)
        t.join(60)
        assert finish is None and isinstance(error, openai.APIError), (finish, error)
        assert "shutting down" in str(error) and after < 30, (error, after)
        assert plain.get("status") == 503 and "shutting down" in plain["message"], plain
        server.proc.wait(20)
    finally:
        server.stop()
