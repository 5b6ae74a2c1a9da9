"""Real processes for the end-to-end tests: two encode servers and language servers in every mode
(disaggregated over ZMQ and over Mooncake, sharing the encoders, and monolithic), on the tiny model."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import torch_threads

HOST = "127.0.0.1"
PIXELS = 4_000_000  # decoded-size limit of every server here (decompression-bomb guard)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Proc:
    """One server process; `wait_healthy` polls GET /health; `metric` reads one Prometheus series."""

    def __init__(self, module: str, model_dir, *flags: str, log_path=None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        cmd = [
            sys.executable,
            "-m",
            module,
            "--model",
            str(model_dir),
            "--host",
            HOST,
            "--port",
            str(self.port),
            "--threads",
            str(torch_threads),
            "--log-level",
            "warning",
            *flags,
        ]
        self.log = open(log_path or os.devnull, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.log_path = log_path

    def wait_healthy(self, timeout: float = 120) -> Proc:
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                tail = open(self.log_path).read()[-3000:] if self.log_path else ""
                raise RuntimeError(f"server exited ({self.proc.returncode}): {tail}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"{self.url} did not become healthy")
            time.sleep(0.2)

    def metric(self, name: str) -> float:
        total, seen = 0.0, False
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total, seen = total + float(line.rsplit(" ", 1)[1]), True
        if not seen and "{" not in name:
            raise KeyError(name)
        return total

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


def encoder(model_dir, tmp, name: str, *flags: str) -> Proc:
    return Proc(
        "encode_server.cli",
        model_dir,
        "--cache-bytes",
        "0",
        "--max-image-pixels",
        str(PIXELS),
        *flags,
        log_path=tmp / f"{name}.log",
    )


def language(model_dir, tmp, name: str, *flags: str) -> Proc:
    return Proc(
        "language_server.cli",
        model_dir,
        "--served-model-name",
        "tiny",
        "--max-image-pixels",
        str(PIXELS),
        "--max-model-len",
        "2048",
        "--debug-endpoints",
        *flags,
        log_path=tmp / f"{name}.log",
    )


@contextlib.contextmanager
def running(start):
    """`start(procs)` fills a dict of processes; all are healthy inside the block, stopped after it."""
    procs: dict[str, Proc] = {}
    try:
        start(procs)
        for p in procs.values():
            p.wait_healthy()
        yield procs
    finally:
        for p in procs.values():
            p.stop()


def disaggregated_flags(encoders: list[Proc], backend: str) -> list[str]:
    urls = ",".join(e.url for e in encoders)
    return [
        "--mode",
        "disaggregated",
        "--encoder-urls",
        urls,
        "--transfer-backend",
        backend,
        "--transfer-host",
        HOST,
        "--encoder-health-interval-s",
        "0.5",
    ]


@pytest.fixture(scope="session")
def cluster(tiny_model_dir, tmp_path_factory):
    """Two encoders (enc1 claims Mooncake rooms ahead of its rows); a ZMQ and a Mooncake language
    server both using them; a monolithic one."""
    tmp = tmp_path_factory.mktemp("e2e-logs")

    def start(procs):
        procs["enc0"] = encoder(tiny_model_dir, tmp, "enc0")
        procs["enc1"] = encoder(tiny_model_dir, tmp, "enc1", "--claim-ahead")
        encs = [procs["enc0"], procs["enc1"]]
        # small rooms: the ZMQ node grows them at the handshake, the Mooncake node makes encoders resume
        small = ["--mm-block-size", "8", "--mm-initial-rows", "8"]
        procs["zmq"] = language(tiny_model_dir, tmp, "zmq", *disaggregated_flags(encs, "zmq"), *small)
        procs["mooncake"] = language(
            tiny_model_dir,
            tmp,
            "mooncake",
            *disaggregated_flags(encs, "mooncake"),
            *small,
            "--no-mm-grow-on-begin",
        )
        procs["mono"] = language(tiny_model_dir, tmp, "mono", "--mode", "monolithic")

    with running(start) as procs:
        yield procs


def openai_client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
