"""compose.yaml, Dockerfile and .dockerignore, checked without a Docker daemon: services build from
the Dockerfile, run console scripts of pyproject.toml with flags those programs accept, and their
ports, URLs and health checks agree; the Dockerfile copies what exists and is not ignored.
"""

from __future__ import annotations

import fnmatch
import re

import yaml

from tests.deploy.conftest import REPO, check_command, flag

COMPOSE = yaml.safe_load((REPO / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]


def encoders() -> dict[str, dict]:
    return {n: s for n, s in SERVICES.items() if s["command"][0] == "encode-server"}


def test_every_service_builds_the_dockerfile_and_runs_a_real_command():
    problems = []
    for name, svc in SERVICES.items():
        assert (
            svc["build"]["dockerfile"] == "Dockerfile"
            and (REPO / svc["build"]["context"] / "Dockerfile").is_file()
        )
        assert isinstance(svc["command"], list), f"{name}: command as a list (no shell parsing)"
        problems += [f"{name}: {p}" for p in check_command(svc["command"])]
    assert not problems, "\n".join(problems)


def test_one_model_builder_two_encoders_one_language_server():
    roles = sorted(s["command"][0] for s in SERVICES.values())
    assert roles == ["deepsplit", "encode-server", "encode-server", "language-server"]
    (builder,) = [s for s in SERVICES.values() if s["command"][0] == "deepsplit"]
    assert builder["command"][1] == "tiny-model" and builder["restart"] == "no"
    model = flag(builder["command"], "--out")
    for name, svc in SERVICES.items():
        if svc is not builder:
            assert flag(svc["command"], "--model") == model, name
            assert svc["depends_on"], f"{name} must wait for what it needs"


def test_language_server_points_at_every_encoder_on_its_port():
    (lang,) = [s for s in SERVICES.values() if s["command"][0] == "language-server"]
    urls = flag(lang["command"], "--encoder-urls").split(",")
    expected = sorted(f"http://{n}:{flag(s['command'], '--port')}" for n, s in encoders().items())
    assert sorted(urls) == expected
    assert flag(lang["command"], "--mode") == "disaggregated"
    port = flag(lang["command"], "--port")
    assert f"{port}:{port}" in lang["ports"], "OpenAI endpoint published on the same port"
    assert set(lang["depends_on"]) >= set(encoders())


def test_healthchecks_hit_ready_on_the_served_port():
    for name, svc in SERVICES.items():
        if svc["command"][0] == "deepsplit":
            continue
        assert flag(svc["command"], "--host") == "0.0.0.0"
        test = " ".join(svc["healthcheck"]["test"])
        assert f"127.0.0.1:{flag(svc['command'], '--port')}/ready" in test, name


def ignored(path: str) -> bool:
    pats = [p for p in (REPO / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    return any(fnmatch.fnmatch(path, p) or path.startswith(p.rstrip("/") + "/") for p in pats)


def test_dockerignore_keeps_local_state_out_and_sources_in():
    for p in (".venv", ".models", ".git", "docs/serve.png"):
        assert ignored(p), p
    text = (REPO / "Dockerfile").read_text()
    copies = re.findall(r"^COPY\s+(.+)$", text, flags=re.M)
    assert copies
    for line in copies:
        for src in line.split()[:-1]:
            assert (REPO / src).exists(), f"Dockerfile copies missing {src}"
            assert not ignored(src), f"Dockerfile copies {src}, which .dockerignore excludes"
    assert "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"^RUN pip install \.", text, flags=re.M)
