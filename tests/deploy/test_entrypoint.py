"""deploy/docker/entrypoint.sh, run on this machine with stand-in programs on PATH: the first argument
picks the program, the transfer address defaults to this host's non-loopback IP, a given one wins.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.deploy.conftest import REPO

ENTRYPOINT = REPO / "deploy" / "docker" / "entrypoint.sh"


def run(tmp_path: Path, *argv: str, **env: str) -> subprocess.CompletedProcess:
    for prog in ("encode-server", "language-server", "deepsplit"):
        stub = tmp_path / prog
        stub.write_text(f'#!/bin/sh\necho {prog} "$@"\nenv | grep ^DEEPSPLIT_ | sort\n')
        stub.chmod(0o755)
    path = f"{tmp_path}:{Path(sys.executable).parent}:{os.environ['PATH']}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DEEPSPLIT_")}
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *argv], env={**clean, "PATH": path, **env}, capture_output=True, text=True
    )


def routable() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))
        except OSError:
            return False
        return True


def test_role_is_chosen_by_the_first_argument(tmp_path):
    for prog in ("encode-server", "language-server", "deepsplit"):
        out = run(tmp_path, prog, "--port", "1")
        assert out.returncode == 0, out.stderr
        assert out.stdout.splitlines()[0] == f"{prog} --port 1"
    assert run(tmp_path).returncode == 2


def test_transfer_host_defaults_to_a_reachable_ip_and_an_explicit_one_wins(tmp_path):
    lines = run(tmp_path, "encode-server").stdout.splitlines()
    (ip,) = {line.split("=", 1)[1] for line in lines if "TRANSFER_HOST=" in line}
    assert ip.count(".") == 3, ip
    if routable():
        assert not ip.startswith("127."), f"{ip}: peers on other hosts cannot reach a loopback address"
    out = run(tmp_path, "encode-server", DEEPSPLIT_ENCODE_TRANSFER_HOST="10.1.2.3").stdout
    assert "DEEPSPLIT_ENCODE_TRANSFER_HOST=10.1.2.3" in out
