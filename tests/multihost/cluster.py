"""The servers of the multi-host tests: two encoders and three language servers in their namespaces,
and the monolithic reference in the host namespace on loopback. The fixtures (conftest.py) start
and stop them; the tests only use them.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.multihost.netns import NetnsThreads, Node, Topology
from tests.multihost.servers import Ask, Server, chat, free_port

TRANSFER_TTL_S = 5.0
LANGUAGE_PORT, ENCODER_PORT, TRANSFER_PORT = 30000, 30100, 31000  # each namespace has its own ports
BACKENDS = ("zmq", "mooncake")


def start_encoder(node: Node, model: Path, logs: Path, hub: NetnsThreads, *flags: str) -> Server:
    return Server(
        node.name,
        "encode_server.cli",
        model,
        node.ip,
        ENCODER_PORT,
        ["--transfer-host", node.ip, "--cache-bytes", "0", *flags],
        logs,
        node.ns,
        hub,
    )


class Cluster:
    """The module's servers: enc1 and enc2; `languages[backend]` using both; `growing` (zmq) starting
    with enc1 alone; all language servers accept registrations. `mono` is the monolithic reference."""

    def __init__(self, net: Topology, hub: NetnsThreads, model: Path, logs: Path) -> None:
        self.net, self.hub, self.model, self.logs = net, hub, model, logs
        self.servers: list[Server] = []
        self._expected: dict[Ask, str] = {}

    def start(self) -> None:
        net, hub, model, logs = self.net, self.hub, self.model, self.logs
        self.mono = self._add(
            Server(
                "mono",
                "language_server.cli",
                model,
                "127.0.0.1",
                free_port(),
                _lang_flags("monolithic"),
                logs,
            )
        )
        self.encoders = {
            n: self._add(start_encoder(net.nodes[n], model, logs, hub)) for n in ("enc1", "enc2")
        }
        both = [e.url for e in self.encoders.values()]
        self.languages = {b: self._language(f"lang-{b}", b, both, i) for i, b in enumerate(BACKENDS)}
        # Starts with enc1 only; encoders added at run time register themselves with it.
        self.growing = self._language("lang-growing", "zmq", both[:1], len(BACKENDS))
        for s in self.servers:
            s.wait_healthy()

    def _language(self, name: str, backend: str, encoder_urls: list[str], i: int) -> Server:
        lang = self.net.nodes["lang"]
        flags = _lang_flags("disaggregated") + [
            "--encoder-urls",
            ",".join(encoder_urls),
            "--allow-encoder-registration",
            "--transfer-backend",
            backend,
            "--transfer-host",
            lang.ip,
            "--transfer-port",
            str(TRANSFER_PORT + i),
        ]
        server = Server(
            name,
            "language_server.cli",
            self.model,
            lang.ip,
            LANGUAGE_PORT + i,
            flags,
            self.logs,
            lang.ns,
            self.hub,
        )
        return self._add(server)

    def _add(self, s: Server) -> Server:
        self.servers.append(s)
        return s

    def expected(self, ask: Ask) -> str:
        """The monolithic server's greedy answer (computed once per request)."""
        if ask not in self._expected:
            self._expected[ask] = chat(self.mono.url, ask)
        return self._expected[ask]

    def stop(self) -> None:
        for s in self.servers:  # all at once, then wait for each
            s.signal(signal.SIGTERM)
        for s in self.servers:
            s.stop()


def _lang_flags(mode: str) -> list[str]:
    return [
        "--mode",
        mode,
        "--served-model-name",
        "tiny",
        "--max-model-len",
        "2048",
        "--encoder-health-interval-s",
        "0.5",
        "--transfer-ttl-s",
        str(TRANSFER_TTL_S),
        "--encode-timeout-s",
        "30",
        "--debug-endpoints",
    ]
