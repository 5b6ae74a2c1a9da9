"""An encoder SIGKILLed under load: every request completes (retried on the other encoder) or fails
with a clear 503, none hangs, and the language node's receive pool drains back to empty."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.e2e.conftest import disaggregated_flags, encoder, language, openai_client, running
from tests.language_server.conftest import data_url, image_message, make_image

pytestmark = pytest.mark.slow


@pytest.fixture
def pair(tiny_model_dir, tmp_path):
    def start(procs):
        procs["a"], procs["b"] = (
            encoder(tiny_model_dir, tmp_path, "a"),
            encoder(tiny_model_dir, tmp_path, "b"),
        )
        flags = disaggregated_flags([procs["a"], procs["b"]], "zmq")
        procs["lang"] = language(tiny_model_dir, tmp_path, "lang", *flags, "--transfer-ttl-s", "5")

    with running(start) as procs:
        yield procs


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
