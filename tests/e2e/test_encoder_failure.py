"""An encoder SIGKILLed under load: every request completes (retried on the other encoder) or fails
with a clear 503, none hangs, and the language node's receive pool drains back to empty. An encoder
that hangs (SIGSTOPped: its kernel keeps the connections open) while it holds requests: they are
retried on the other one once it failed its health probes, not held to their deadline; a client
that gives up while its images are being encoded frees its room at once, and a request still
waiting for its encode when the language server's drain ends gets a 503."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.e2e.conftest import disaggregated_flags, encoder, language, openai_client, running
from tests.language_server.conftest import data_url, image_message, make_image

pytestmark = pytest.mark.slow


def _two_encoders(tiny_model_dir, tmp_path, *language_flags):
    """Encoders a and b behind one ZMQ language server with these extra flags."""

    def start(procs):
        procs["a"], procs["b"] = (
            encoder(tiny_model_dir, tmp_path, "a"),
            encoder(tiny_model_dir, tmp_path, "b"),
        )
        flags = disaggregated_flags([procs["a"], procs["b"]], "zmq")
        procs["lang"] = language(tiny_model_dir, tmp_path, "lang", *flags, *language_flags)

    return running(start)


@pytest.fixture
def pair(tiny_model_dir, tmp_path):
    with _two_encoders(tiny_model_dir, tmp_path, "--transfer-ttl-s", "5") as procs:
        yield procs


@pytest.fixture
def slow_deadline_pair(tiny_model_dir, tmp_path):
    """A 60 s transfer deadline and probes that give up after 1 s."""
    flags = ("--transfer-ttl-s", "60", "--encoder-probe-timeout-s", "1")
    with _two_encoders(tiny_model_dir, tmp_path, *flags) as procs:
        yield procs


def test_requests_held_by_a_hung_encoder_move_to_the_other(slow_deadline_pair):
    pair = slow_deadline_pair
    url, a = pair["lang"].url, pair["a"]
    msgs = [image_message(f"Scene {i}?", [data_url(make_image(160, 160, 500 + i))]) for i in range(12)]

    def one(m):
        c = openai_client(url).with_options(timeout=120, max_retries=0)
        t = time.monotonic()
        try:
            r = c.chat.completions.create(model="tiny", messages=m, max_tokens=4, temperature=0)
            return ("ok" if r.choices[0].message.content else "empty"), time.monotonic() - t
        except openai.APIError as e:
            return str(e), time.monotonic() - t

    # it answers nothing from now on, and looks healthy until a probe has timed out (1 s): the first
    # requests, spread over both encoders, find it holding them
    os.killpg(a.proc.pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(4) as ex:
            results = list(ex.map(one, msgs))
        assert all(r[0] == "ok" for r in results), results
        encoders = {e["url"]: e for e in httpx.get(url + "/debug/engine", timeout=10).json()["encoders"]}
        assert encoders[a.url]["failures"] >= 1 and encoders[a.url]["served"] == 0, encoders[a.url]
        # held to the deadline a request would take over 60 s; given up after the failed probes, a few
        assert max(r[1] for r in results) < 30, results
    finally:
        os.killpg(a.proc.pid, signal.SIGCONT)
    end = time.monotonic() + 15
    while pair["lang"].metric("deepsplit_language_mm_buffer_blocks_used") != 0 and time.monotonic() < end:
        time.sleep(0.2)
    assert pair["lang"].metric("deepsplit_language_mm_buffer_blocks_used") == 0


@pytest.fixture
def patient_pair(tiny_model_dir, tmp_path):
    """Nothing gives up on an encoder for a minute (long deadline, slow probes, no stall rule); the
    language server drains for 1 s only."""
    flags = ("--transfer-ttl-s", "60", "--encoder-probe-timeout-s", "30", "--encoder-stalled-probes", "0")
    flags += ("--shutdown-grace-s", "1")
    with _two_encoders(tiny_model_dir, tmp_path, *flags) as procs:
        yield procs


def test_a_client_that_leaves_during_the_encode_frees_its_room(patient_pair):
    pair, lang = patient_pair, patient_pair["lang"]
    encoders = [pair["a"], pair["b"]]
    used = lambda: lang.metric("deepsplit_language_mm_buffer_blocks_used")  # noqa: E731
    for e in encoders:  # both hang: the request waits for its encode until the client leaves
        os.killpg(e.proc.pid, signal.SIGSTOP)
    try:

        def leave(stream: bool) -> str:
            c = openai_client(lang.url).with_options(timeout=2, max_retries=0)
            m = image_message("Where?", [data_url(make_image(96, 96, 7 + stream))])
            try:
                c.chat.completions.create(model="tiny", messages=m, max_tokens=4, stream=stream)
            except openai.APITimeoutError:
                return "gave up"
            return "answered"

        with ThreadPoolExecutor(2) as ex:
            assert list(ex.map(leave, (False, True))) == ["gave up", "gave up"]
        end = time.monotonic() + 10  # held to its deadline, a room would stay for a minute
        while used() != 0 and time.monotonic() < end:
            time.sleep(0.2)
        assert used() == 0
        engine = httpx.get(lang.url + "/debug/engine", timeout=10).json()
        assert engine["waiting_for_embeddings"] == 0, engine
    finally:
        for e in encoders:
            os.killpg(e.proc.pid, signal.SIGCONT)


def test_a_request_waiting_for_its_encode_when_the_drain_ends_gets_a_503(patient_pair):
    pair, lang = patient_pair, patient_pair["lang"]
    for e in (pair["a"], pair["b"]):
        os.killpg(e.proc.pid, signal.SIGSTOP)
    try:
        got: dict = {}

        def ask():
            c = openai_client(lang.url).with_options(timeout=60, max_retries=0)
            m = image_message("What?", [data_url(make_image(96, 96, 11))])
            try:
                c.chat.completions.create(model="tiny", messages=m, max_tokens=4)
            except openai.APIError as e:
                got.update(error=e, after=time.monotonic() - sent)

        t = threading.Thread(target=ask)
        t.start()
        end = time.monotonic() + 30
        while httpx.get(lang.url + "/debug/engine", timeout=10).json()["waiting_for_embeddings"] < 1:
            assert time.monotonic() < end
            time.sleep(0.05)
        sent = time.monotonic()
        os.killpg(lang.proc.pid, signal.SIGTERM)
        t.join(60)
        error = got.get("error")
        assert isinstance(error, openai.APIStatusError) and error.status_code == 503, got
        assert "shutting down" in error.message and got["after"] < 10, got
        lang.proc.wait(20)
    finally:
        for e in (pair["a"], pair["b"]):
            os.killpg(e.proc.pid, signal.SIGCONT)


def test_sigkill_one_encoder_under_load(pair):
    url = pair["lang"].url
    msgs = [image_message(f"Picture {i}?", [data_url(make_image(160, 160, 300 + i))]) for i in range(24)]
    served = lambda: pair["a"].metric('deepsplit_encode_requests_total{status="ok"}')  # noqa: E731
    killed = threading.Event()

    def killer():
        end = time.monotonic() + 60
        while time.monotonic() < end:  # kill it while it holds a request (best effort)
            if served() >= 1 and pair["a"].metric("deepsplit_encode_inflight") >= 1:
                break
        pair["a"].kill()
        killed.set()

    def one(m):
        c = openai_client(url).with_options(timeout=60)
        try:
            r = c.chat.completions.create(model="tiny", messages=m, max_tokens=4, temperature=0)
            return "ok", r.choices[0].message.content
        except openai.APIStatusError as e:
            return e.status_code, e.message

    t = threading.Thread(target=killer)
    t.start()
    with ThreadPoolExecutor(6) as ex:
        results = list(ex.map(one, msgs))
    t.join()
    assert killed.is_set()
    failures = [r for r in results if r[0] != "ok"]
    assert all(code == 503 and "encod" in msg for code, msg in failures), failures
    assert len(failures) <= 6, results  # retries on the survivor carry (almost) everything
    # the dead encoder is out of rotation: new requests all succeed on the survivor
    for m in msgs[:4]:
        assert one(m)[0] == "ok"
    end = time.monotonic() + 15
    while pair["lang"].metric("deepsplit_language_mm_buffer_blocks_used") != 0 and time.monotonic() < end:
        time.sleep(0.2)
    assert pair["lang"].metric("deepsplit_language_mm_buffer_blocks_used") == 0
