"""Server processes for the multi-host tests, each in its own process group, optionally inside a
network namespace (`ip netns exec NS python -m ...`), and the OpenAI client calls made against them.

HTTP to a server in a namespace goes through `NetnsThreads` (threads living in the hub namespace);
a server in the host namespace (the monolithic reference, on loopback) is reached directly.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.multihost.netns import NetnsThreads

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m <module> --model M --host H --port P <flags>`; logs to `log_dir/<name>.log`."""

    def __init__(
        self,
        name: str,
        module: str,
        model_dir: Path,
        host: str,
        port: int,
        flags: list[str],
        log_dir: Path,
        ns: str | None = None,
        via: NetnsThreads | None = None,
    ) -> None:
        self.name, self.ns, self.via = name, ns, via
        self.url = f"http://{host}:{port}"
        cmd = [sys.executable, "-m", module, "--model", str(model_dir), "--host", host, "--port", str(port)]
        cmd += ["--threads", "1", "--log-level", "warning", *flags]
        if ns:
            cmd = ["ip", "netns", "exec", ns, *cmd]  # ip execs the command: the pid is the server's
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    # ---- HTTP (through the hub namespace when the server lives in one) ----
    def get(self, path: str, timeout: float = 10.0) -> httpx.Response:
        def go() -> httpx.Response:
            return httpx.get(self.url + path, timeout=timeout)

        return self.via.call(go) if self.via else go()

    def wait_healthy(self, timeout: float = 120.0) -> Server:
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                if self.get("/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"{self.name} did not become healthy: {self.log_tail()}")
            time.sleep(0.2)

    def metric(self, name: str) -> float:
        """Sum of every series of `name` (labels matched as a prefix: `x{status="ok"` works); 0 if absent."""
        total = 0.0
        for line in self.get("/metrics").text.splitlines():
            if line.startswith((name + " ", name + "{")) or ("{" in name and line.startswith(name)):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def debug(self) -> dict:
        return self.get("/debug/engine").json()

    def log_tail(self, n: int = 3000) -> str:
        self._log.flush()
        return self.log_path.read_bytes()[-n:].decode(errors="replace")

    # ---- lifetime ----
    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 15.0) -> None:
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(10)
        try:  # stragglers of the group (none expected), then the log
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


# ---- requests ----
@dataclass(frozen=True)
class Ask:
    """One chat request: a prompt and images given as (width, height, seed) of random-noise PNGs."""

    prompt: str
    images: tuple[tuple[int, int, int], ...] = ()
    max_tokens: int = 6

    def messages(self) -> list[dict]:
        parts: list[dict] = [{"type": "image_url", "image_url": {"url": png(*im)}} for im in self.images]
        return [{"role": "user", "content": [*parts, {"type": "text", "text": self.prompt}]}]


def png(w: int, h: int, seed: int) -> str:
    """Noise compresses badly, so the image bytes on the wire are about w * h * 3."""
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(base_url: str, ask: Ask, timeout: float = 60.0) -> str:
    """Greedy chat completion with the openai client (no retries: a failure is the server's answer)."""
    from openai import OpenAI

    with OpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=timeout) as client:
        r = client.chat.completions.create(
            model=MODEL, messages=ask.messages(), max_tokens=ask.max_tokens, temperature=0
        )
    return r.choices[0].message.content or ""
