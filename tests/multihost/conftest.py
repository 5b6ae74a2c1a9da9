"""Fixtures of the multi-host tests: the namespace network (hub + lang, enc1, enc2, enc3), threads in
the hub namespace, and the module's servers (`Cluster`). Everything is removed at the end of the
module, also after a failure; tests are skipped only where network namespaces cannot be made.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.multihost.cluster import Cluster
from tests.multihost.netns import NetnsThreads, Topology, namespaces_forbidden, sweep_leftovers


@pytest.fixture(scope="module")
def net():
    """Hub + nodes lang, enc1, enc2, enc3 (198.18.0.10..13); removed afterwards."""
    why = namespaces_forbidden()
    if why:
        pytest.skip(f"network namespaces are not available: {why}")
    sweep_leftovers()
    topo = Topology(f"{os.getpid()}")
    try:
        for name in ("lang", "enc1", "enc2", "enc3"):
            topo.add(name)
        yield topo
    finally:
        topo.close()


@pytest.fixture(scope="module")
def hub(net):
    """Threads in the hub namespace: the clients, and how this process reaches the servers."""
    pool = NetnsThreads(net.hub)
    yield pool
    pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("multihost-logs")


@pytest.fixture(scope="module")
def cluster(net, hub, tiny_model_dir, logs):
    c = Cluster(net, hub, tiny_model_dir, logs)
    try:
        c.start()
        yield c
    finally:
        c.stop()
