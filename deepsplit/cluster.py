"""`deepsplit up`: start N encode servers and M language servers on this host, wait until all are
ready, put a router in front when M > 1 (one OpenAI endpoint), print the endpoints, and stop them all
cleanly on Ctrl-C / SIGTERM (or when one dies).

`Cluster` is also the programmatic handle tests and `deepsplit demo` use. Ports come from
configs/cluster.yaml (or flags); this module only launches and supervises processes.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from deepsplit.router import POLICIES, router_command, wait_router_ready
from deepsplit.settings import SettingsError, load_settings


class ClusterSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = ".models/tiny"
    host: str = "127.0.0.1"
    language_base_port: int = Field(30000, ge=1, le=65535)
    encoder_base_port: int = Field(31000, ge=1, le=65535)
    router_port: int = Field(29000, ge=1, le=65535)
    # what sits in front of the language servers when languages > 1: sglang (sglang-router) | none
    router: str = Field("sglang", pattern="^(sglang|none)$")
    router_policy: str = Field("round_robin", pattern=f"^({'|'.join(POLICIES)})$")
    router_metrics_port: int = Field(29001, ge=1, le=65535)
    router_health_interval_s: float = Field(5.0, gt=0)
    router_args: list[str] = []
    encoders: int = Field(1, ge=0)
    languages: int = Field(1, ge=1)
    backend: str = Field("zmq", pattern="^(mooncake|zmq)$")
    encode_config: str | None = "configs/encode.yaml"
    language_config: str | None = "configs/language.yaml"
    ready_timeout_s: float = Field(180, gt=0)
    encoder_args: list[str] = []
    language_args: list[str] = []

    @model_validator(mode="after")
    def _distinct_router_ports(self) -> ClusterSettings:
        if self.router_port == self.router_metrics_port:
            raise ValueError("router_port and router_metrics_port must differ")
        return self

    @property
    def use_router(self) -> bool:
        return self.router != "none" and self.languages > 1


class Cluster:
    def __init__(self, s: ClusterSettings, log_dir: str | Path | None = None) -> None:
        self.s = s
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.log_dir = Path(log_dir) if log_dir else None

    @property
    def encoder_urls(self) -> list[str]:
        return [f"http://{self.s.host}:{self.s.encoder_base_port + j}" for j in range(self.s.encoders)]

    @property
    def language_urls(self) -> list[str]:
        return [f"http://{self.s.host}:{self.s.language_base_port + i}" for i in range(self.s.languages)]

    @property
    def router_url(self) -> str:
        return f"http://{self.s.host}:{self.s.router_port}"

    @property
    def endpoint(self) -> str:
        """The one URL clients use: the router when there is one, else the (only) language server."""
        return self.router_url if self.s.use_router else self.language_urls[0]

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = None
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            out = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True
        )
        self.procs.append((name, proc))

    def start(self) -> Cluster:
        py, s = sys.executable, self.s
        for j in range(s.encoders):
            cmd = [
                py,
                "-m",
                "encode_server.cli",
                "--model",
                s.model,
                "--host",
                s.host,
                "--port",
                str(s.encoder_base_port + j),
                "--transfer-host",
                s.host,
            ]
            if s.encode_config and Path(s.encode_config).is_file():
                cmd += ["--config", s.encode_config]
            self._spawn(f"encoder-{j}", cmd + list(s.encoder_args))
        mode = "disaggregated" if s.encoders else "monolithic"
        for i in range(s.languages):
            cmd = [
                py,
                "-m",
                "language_server.cli",
                "--model",
                s.model,
                "--host",
                s.host,
                "--port",
                str(s.language_base_port + i),
                "--mode",
                mode,
            ]
            if s.encoders:
                cmd += ["--encoder-urls", ",".join(self.encoder_urls), "--transfer-backend", s.backend]
                cmd += ["--transfer-host", s.host]
            if s.language_config and Path(s.language_config).is_file():
                cmd += ["--config", s.language_config]
            self._spawn(f"language-{i}", cmd + list(s.language_args))
        try:
            self.wait_ready()
            if s.use_router:
                self.start_router()
        except BaseException:
            self.stop()
            raise
        return self

    def start_router(self) -> None:
        """Start the router in front of `language_urls` (already serving) and wait until it routes."""
        s = self.s
        cmd = router_command(
            self.language_urls,
            s.host,
            s.router_port,
            s.router_metrics_port,
            s.router_policy,
            s.router_health_interval_s,
            s.router_args,
        )
        self._spawn("router", cmd)
        wait_router_ready(self.router_url, s.languages, s.ready_timeout_s, self.procs[-1][1])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.s.ready_timeout_s
        pending = dict(zip([n for n, _ in self.procs], self.encoder_urls + self.language_urls, strict=True))
        while pending:
            for name, proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode} before it was ready")
            for name, url in list(pending.items()):
                try:
                    if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                        del pending[name]
                except httpx.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"not ready after {self.s.ready_timeout_s}s: {sorted(pending)}")
            time.sleep(0.3)

    def dead(self) -> list[str]:
        return [name for name, p in self.procs if p.poll() is not None]

    def stop(self, grace_s: float = 10.0) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for _, p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p, signal.SIGKILL)
                p.wait(timeout=5)
        self.procs.clear()

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="configs/cluster.yaml" if Path("configs/cluster.yaml").is_file() else None
    )
    parser.add_argument("--model")
    parser.add_argument("--encoders", type=int)
    parser.add_argument("--languages", type=int)
    parser.add_argument("--backend", choices=["mooncake", "zmq"])
    parser.add_argument("--host")
    parser.add_argument("--language-base-port", type=int, help="language server i listens on this + i")
    parser.add_argument("--encoder-base-port", type=int, help="encoder j listens on this + j")
    parser.add_argument("--router-port", type=int, help="the router's port (languages > 1)")
    parser.add_argument("--router-metrics-port", type=int, help="the router's Prometheus port")
    parser.add_argument("--router", choices=["sglang", "none"], help="router in front of >1 language servers")
    parser.add_argument("--router-policy", choices=list(POLICIES))
    parser.add_argument(
        "--log-dir", help="write each process's output to DIR/NAME.log instead of this terminal"
    )


def settings_from_args(args: argparse.Namespace) -> ClusterSettings:
    keys = (
        "model",
        "encoders",
        "languages",
        "backend",
        "host",
        "router",
        "router_policy",
        "language_base_port",
        "encoder_base_port",
        "router_port",
        "router_metrics_port",
    )
    return load_settings(ClusterSettings, args.config, {k: getattr(args, k) for k in keys})


def print_endpoints(cluster: Cluster) -> None:
    for url in cluster.encoder_urls:
        print(f"  encode server    {url}")
    for url in cluster.language_urls:
        print(f"  language server  {url}/v1")
    if cluster.s.use_router:
        print(f"  router           {cluster.router_url}   ({cluster.s.router}, {cluster.s.router_policy})")
    print(f"  OpenAI endpoint  {cluster.endpoint}/v1")


def serve_until_signal(cluster: Cluster) -> int:
    stop = {"sig": None}

    def handler(signum, _frame):
        stop["sig"] = signum

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    code = 0
    while stop["sig"] is None:
        dead = cluster.dead()
        if dead:
            print(f"deepsplit: {', '.join(dead)} exited; stopping the cluster", file=sys.stderr)
            code = 1
            break
        time.sleep(0.5)
    print("deepsplit: stopping all servers ...")
    cluster.stop()
    return code


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args)
    except SettingsError as e:
        print(f"deepsplit up: {e}", file=sys.stderr)
        return 2
    cluster = Cluster(settings, args.log_dir)
    print(
        f"deepsplit: starting {settings.encoders} encoder(s) and {settings.languages} language server(s) ..."
    )
    cluster.start()
    print("deepsplit: ready")
    print_endpoints(cluster)
    return serve_until_signal(cluster)
