"""A real `language-server` process on the tiny checkpoint (ephemeral port, monolithic mode)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import torch_threads

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, model_dir, *flags: str, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            "language_server.cli",
            "--model",
            str(model_dir),
            "--port",
            str(self.port),
            "--mode",
            "monolithic",
            "--threads",
            str(torch_threads),
            "--api-key",
            API_KEY,
            "--served-model-name",
            "tiny",
            "--log-level",
            "warning",
            *flags,
        ]
        self.log = open(os.devnull, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, env={**os.environ, **(env or {})}, stdout=self.log, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not become healthy")
            time.sleep(0.2)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        if "{" in name:  # a labelled series not seen yet
            return 0.0
        raise KeyError(name)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="session")
def server(tiny_model_dir):
    s = ServerProcess(
        tiny_model_dir,
        "--max-model-len",
        "512",
        "--debug-endpoints",
        "--max-num-batched-tokens",
        "256",
        env={
            "DEEPSPLIT_LANGUAGE_MAX_IMAGE_PIXELS": "1000000",
            "DEEPSPLIT_LANGUAGE_MAX_IMAGES_PER_REQUEST": "2",
            "DEEPSPLIT_LANGUAGE_MAX_REQUEST_BYTES": "2000000",
        },
    )
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
