"""Hosts made of Linux network namespaces: a hub namespace holding a bridge, one namespace per node
joined to it by a veth pair, addresses in 198.18.0.0/24 (the benchmarking range). The host's own
namespace gets nothing: no interface, no address, no route.

`Topology` builds and removes it, shapes or cuts a node's link (`tc ... tbf`, `ip link set down`),
runs commands inside a node (`ip netns exec`) and reads link counters. `NetnsThreads` is a thread
pool whose threads live in one namespace (setns(2)), so this process can be a client "on the
network" without routes in its own namespace. Servers are started by the fixtures (conftest.py).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import json
import os
import signal
import subprocess
from dataclasses import dataclass

SUBNET = "198.18.0"
HUB_IP = f"{SUBNET}.1"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def namespaces_forbidden() -> str | None:
    """None if `ip netns add` works here, else why not (for the skip reason)."""
    probe = f"ds-probe-{os.getpid()}"
    try:
        r = ip("netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run `ip netns add`: {e}"
    if r.returncode != 0:
        return f"`ip netns add` is not allowed here: {r.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def sweep_leftovers() -> list[str]:
    """Remove namespaces `ds-<role>-<pid>` of runs whose pytest process is gone (killed before its
    teardown), after killing what still runs in them. Returns the names removed."""
    removed = []
    for line in ip("netns", "list").stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        parts = ns.split("-")
        if len(parts) != 3 or parts[0] != "ds" or not parts[2].isdigit() or _alive(int(parts[2])):
            continue
        for pid in ip("netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        ip("netns", "del", ns, check=False)
        removed.append(ns)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into network namespace `ns`."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


class NetnsThreads(concurrent.futures.ThreadPoolExecutor):
    """Worker threads that all live in namespace `ns`: sockets they open belong to it."""

    def __init__(self, ns: str, workers: int = 16) -> None:
        super().__init__(max_workers=workers, thread_name_prefix=ns, initializer=enter_netns, initargs=(ns,))

    def call(self, fn, *args, **kwargs):
        return self.submit(fn, *args, **kwargs).result()


@dataclass
class Node:
    name: str
    ns: str
    ip: str
    dev: str  # its end of the veth, inside `ns`
    hub_dev: str  # the other end, on the hub's bridge


class Topology:
    """Hub + nodes; every name carries `tag` so concurrent runs and leftovers never collide."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.hub = f"ds-hub-{tag}"
        self.nodes: dict[str, Node] = {}
        self._made: list[str] = []
        ip("netns", "add", self.hub)
        self._made.append(self.hub)
        try:
            self.hub_exec("ip", "link", "set", "lo", "up")
            self.hub_exec("ip", "link", "add", "br0", "type", "bridge")
            self.hub_exec("ip", "addr", "add", f"{HUB_IP}/24", "dev", "br0")
            self.hub_exec("ip", "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def add(self, name: str) -> Node:
        """A node namespace `ds-<name>-<tag>` with address 198.18.0.<10 + index> on `eth0`."""
        ns = f"ds-{name}-{self.tag}"
        node = Node(name, ns, f"{SUBNET}.{10 + len(self.nodes)}", "eth0", f"v-{name}"[:15])
        ip("netns", "add", ns)
        self._made.append(ns)
        # Both ends are created straight inside their namespaces: nothing appears in the host's.
        ip(
            "link",
            "add",
            node.dev,
            "netns",
            ns,
            "type",
            "veth",
            "peer",
            "name",
            node.hub_dev,
            "netns",
            self.hub,
        )
        self.hub_exec("ip", "link", "set", node.hub_dev, "master", "br0")
        self.hub_exec("ip", "link", "set", node.hub_dev, "up")
        self.exec(node, "ip", "link", "set", "lo", "up")
        self.exec(node, "ip", "addr", "add", f"{node.ip}/24", "dev", node.dev)
        self.exec(node, "ip", "link", "set", node.dev, "up")
        self.nodes[name] = node
        return node

    def exec(self, node: Node | str, *cmd: str) -> str:
        ns = node.ns if isinstance(node, Node) else node
        r = subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"[{ns}] {' '.join(cmd)}: {r.stderr.strip()}")
        return r.stdout

    def hub_exec(self, *cmd: str) -> str:
        return self.exec(self.hub, *cmd)

    @contextlib.contextmanager
    def throttled(self, nodes: list[Node], rate: str, burst: str = "32kbit", latency: str = "400ms"):
        """Token-bucket limit (`tc ... tbf`) on what each node sends, removed on exit."""
        done = []
        try:
            for n in nodes:
                tbf = ["rate", rate, "burst", burst, "latency", latency]
                self.exec(n, "tc", "qdisc", "add", "dev", n.dev, "root", "tbf", *tbf)
                done.append(n)
            yield
        finally:
            for n in done:
                self.exec(n, "tc", "qdisc", "del", "dev", n.dev, "root")

    def qdisc_bytes(self, node: Node) -> int:
        """Bytes sent through `node`'s root qdisc (the tbf while throttled)."""
        return int(
            json.loads(self.exec(node, "tc", "-s", "-j", "qdisc", "show", "dev", node.dev))[0]["bytes"]
        )

    def link(self, node: Node, up: bool) -> None:
        self.exec(node, "ip", "link", "set", node.dev, "up" if up else "down")

    def tx_bytes(self, node: Node) -> int:
        """Bytes `node` has sent over its link."""
        stats = json.loads(self.exec(node, "ip", "-j", "-s", "link", "show", "dev", node.dev))
        return int(stats[0]["stats64"]["tx"]["bytes"])

    def close(self) -> None:
        """Delete every namespace made (their veths go with them). Processes must be gone first."""
        errors = [ip("netns", "del", ns, check=False).stderr.strip() for ns in reversed(self._made)]
        self._made.clear()
        if any(errors):
            raise RuntimeError(f"netns cleanup: {'; '.join(e for e in errors if e)}")
