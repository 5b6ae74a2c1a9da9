"""The router in front of several language servers, started by `Cluster.start_router` (the code path
`deepsplit up` takes): real router process, two stand-in language servers (uvicorn processes), the
real openai client. Both servers get requests; with one killed, requests still succeed.
"""

from __future__ import annotations

import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deepsplit.cluster import Cluster, ClusterSettings
from deepsplit.router import router_command

pytest.importorskip("sglang_router")
FAKE = Path(__file__).with_name("fake_language_server.py")


def _free_block(n: int) -> int:
    """A base port with n free consecutive ports after it."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        try:
            socks = []
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def _wait_up(url: str, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"{url} exited"
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


@pytest.fixture
def routed(tmp_path):
    base = _free_block(4)  # 2 language servers, router, router metrics
    s = ClusterSettings(
        host="127.0.0.1",
        languages=2,
        encoders=0,
        language_base_port=base,
        router_port=base + 2,
        router_metrics_port=base + 3,
        ready_timeout_s=30,
    )
    cluster = Cluster(s, log_dir=tmp_path)
    workers = []
    for i, url in enumerate(cluster.language_urls):
        port = url.rsplit(":", 1)[1]
        cmd = [sys.executable, str(FAKE), "--port", port, "--name", f"w{i}", "--model", "tiny"]
        workers.append(subprocess.Popen(cmd, start_new_session=True))
    try:
        for url, proc in zip(cluster.language_urls, workers, strict=True):
            _wait_up(url, proc)
        cluster.start_router()
        yield cluster, workers
    finally:
        cluster.stop()
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait(timeout=10)


def test_router_command_always_sets_its_metrics_port():
    cmd = router_command(["http://h:1", "http://h:2"], "127.0.0.1", 29000, 29001, "cache_aware")
    assert cmd[cmd.index("--prometheus-port") + 1] == "29001"
    assert cmd[cmd.index("--worker-urls") + 1 : cmd.index("--worker-urls") + 3] == [
        "http://h:1",
        "http://h:2",
    ]
    with pytest.raises(ValueError):
        router_command(["http://h:1"], "127.0.0.1", 29000, 29001, "no_such_policy")


def test_endpoint_is_the_router_only_with_several_language_servers():
    assert Cluster(ClusterSettings(languages=1)).endpoint == "http://127.0.0.1:30000"
    assert Cluster(ClusterSettings(languages=2)).endpoint == "http://127.0.0.1:29000"
    assert Cluster(ClusterSettings(languages=2, router="none")).endpoint == "http://127.0.0.1:30000"
    with pytest.raises(ValueError):
        ClusterSettings(router_port=29000, router_metrics_port=29000)


@pytest.mark.slow
def test_router_spreads_requests_and_survives_a_dead_server(routed):
    from openai import OpenAI

    cluster, workers = routed
    client = OpenAI(base_url=cluster.endpoint + "/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]  # learnt from /server_info

    def ask(stream: bool = False) -> str:
        msgs = [{"role": "user", "content": "hi"}]
        if stream:
            chunks = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        r = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=4)
        return r.choices[0].message.content

    answers = [ask() for _ in range(6)] + [ask(stream=True) for _ in range(4)]
    assert set(answers) == {"w0", "w1"}, answers

    workers[1].send_signal(signal.SIGKILL)
    workers[1].wait(timeout=10)
    after = [ask() for _ in range(10)] + [ask(stream=True) for _ in range(2)]
    assert after == ["w0"] * 12
