"""The L7 router that puts one OpenAI endpoint in front of several language servers: sglang-router
(the Rust `sglang_router` package), launched as a separate process.

This module only builds its command line and waits until it routes; `deepsplit.cluster` owns the
process. The router needs nothing from our servers beyond `/health` and the OpenAI routes; it also
reads `/server_info` when a server has it (to name the model in its own `/v1/models`).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time

import httpx

POLICIES = ("round_robin", "random", "cache_aware")


def router_command(
    worker_urls: list[str],
    host: str,
    port: int,
    metrics_port: int,
    policy: str = "round_robin",
    health_interval_s: float = 5.0,
    extra_args: list[str] = (),
) -> list[str]:
    """`python -m sglang_router.launch_router ...` for these workers.

    The metrics port is always given: the router's default (29000) would otherwise collide with
    our default router port and the router would exit with "Address already in use".
    """
    if importlib.util.find_spec("sglang_router") is None:
        raise RuntimeError("router 'sglang' needs the sglang-router package (pip install sglang-router)")
    if policy not in POLICIES:
        raise ValueError(f"router policy {policy!r} is not one of {POLICIES}")
    return [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        host,
        "--port",
        str(port),
        "--worker-urls",
        *worker_urls,
        "--policy",
        policy,
        "--prometheus-host",
        host,
        "--prometheus-port",
        str(metrics_port),
        "--health-check-endpoint",
        "/health",
        "--health-check-interval-secs",
        str(max(1, round(health_interval_s))),
        "--worker-startup-check-interval",
        "1",
        "--log-level",
        "warn",
        *extra_args,
    ]


def router_ready(url: str, n_workers: int, timeout_s: float = 2.0) -> bool:
    """True once the router has registered all `n_workers` as healthy.

    Its `/health` answers 200 before any worker is registered, so it is not a readiness signal;
    `/readiness` plus the `/workers` list are.
    """
    try:
        if httpx.get(f"{url}/readiness", timeout=timeout_s).status_code != 200:
            return False
        workers = httpx.get(f"{url}/workers", timeout=timeout_s).json().get("workers", [])
    except (httpx.HTTPError, ValueError):
        return False
    return sum(1 for w in workers if w.get("is_healthy")) >= n_workers


def wait_router_ready(
    url: str, n_workers: int, timeout_s: float, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while not router_ready(url, n_workers):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"router exited with code {proc.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise TimeoutError(f"router at {url} did not register {n_workers} workers in {timeout_s}s")
        time.sleep(0.2)
