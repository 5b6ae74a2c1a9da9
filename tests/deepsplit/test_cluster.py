"""`deepsplit up` and `deepsplit demo` as a user runs them: real processes, the router in front of two
language servers, image chat through the one endpoint, both encoders used, clean stop on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from openai import OpenAI

from tests.language_server.conftest import data_url, image_message, make_image

pytestmark = pytest.mark.slow


def free_block(n: int) -> int:
    """A base port with n free ports after it (best effort)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n >= 65000:
            continue
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free port block")


def ports_flags() -> list[str]:
    return [
        "--language-base-port",
        str(free_block(2)),
        "--encoder-base-port",
        str(free_block(2)),
        "--router-port",
        str(free_block(1)),
        "--router-metrics-port",
        str(free_block(1)),
    ]


def test_up_two_languages_behind_the_router_two_encoders_mooncake(tiny_model_dir, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "deepsplit.cli",
        "up",
        "--model",
        str(tiny_model_dir),
        "--encoders",
        "2",
        "--languages",
        "2",
        "--backend",
        "mooncake",
        "--log-dir",
        str(tmp_path),
        *ports_flags(),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    lines: list[str] = []
    try:
        end = time.monotonic() + 240
        endpoint = None
        while endpoint is None:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            if line.strip().startswith("OpenAI endpoint"):
                endpoint = line.split()[-1]
            assert time.monotonic() < end, "".join(lines)
        enc_urls = [ln.split()[-1] for ln in lines if ln.strip().startswith("encode server")]
        lang_urls = [ln.split()[-1] for ln in lines if ln.strip().startswith("language server")]
        assert len(enc_urls) == 2 and len(lang_urls) == 2 and endpoint not in lang_urls
        client = OpenAI(base_url=endpoint, api_key="x", max_retries=0, timeout=60)
        outs = []
        model = OpenAI(base_url=lang_urls[0], api_key="x").models.list().data[0].id
        for _ in range(6):
            msgs = image_message("What is this?", [data_url(make_image(48, 64, 7))])
            r = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, temperature=0)
            outs.append(r.choices[0].message.content)
        assert len(set(outs)) == 1  # same image, greedy: the same answer whichever node served it
        served = [_metric(u, 'deepsplit_encode_requests_total{status="ok"}') for u in enc_urls]
        assert all(s > 0 for s in served), served
        handled = [_metric(u.removesuffix("/v1"), "deepsplit_language_requests_total") for u in lang_urls]
        assert all(h > 0 for h in handled), handled
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    for u in enc_urls + lang_urls + [endpoint]:
        with pytest.raises(httpx.HTTPError):
            httpx.get(u.removesuffix("/v1") + "/health", timeout=2)


def _metric(url: str, name: str) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_demo_answers_one_image_request(tiny_model_dir, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "deepsplit.cli",
        "demo",
        "--model",
        str(tiny_model_dir),
        "--no-wait",
        "--log-dir",
        str(tmp_path),
        *ports_flags(),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "assistant: " in r.stdout and "curl http://" in r.stdout and "OpenAI endpoint" in r.stdout
