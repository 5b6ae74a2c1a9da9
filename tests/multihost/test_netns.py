"""Disaggregated serving across "hosts": each server runs in its own network namespace, joined to a
hub bridge by a veth pair (198.18.0.0/24), so encode requests and image rows cross real links that
can be throttled (tc tbf) or cut (link down). Clients run in the hub namespace with the openai
client; answers are checked against a monolithic server on the same checkpoint (greedy decoding).

Cases: baseline and throttled links (ZMQ and Mooncake each), a link cut mid-transfer (both), an
encoder added and one removed (SIGTERM, SIGKILL) while traffic runs. A Mooncake write that outlives
its room is test_stale_write.py. Not covered: RDMA, routing between subnets, DNS discovery.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import openai
import pytest

from tests.multihost.cluster import BACKENDS, TRANSFER_TTL_S, Cluster, start_encoder
from tests.multihost.netns import NetnsThreads
from tests.multihost.servers import Ask, Server, chat

pytestmark = pytest.mark.slow

BASE = [
    Ask("Describe the image.", ((64, 64, 1),)),
    Ask("What differs between these pictures?", ((128, 96, 2), (96, 128, 3))),
    Ask("Name the colours.", ((256, 256, 4),)),
    Ask("Say hello.", ()),  # text only: never reaches an encoder
]
ROW_BYTES = 64 * 4 * (1 + 3)  # tiny model: one vision row = hidden 64 fp32, plus 3 deepstack rows
OK = 'deepsplit_encode_requests_total{status="ok"'
BLOCKS_USED = "deepsplit_language_mm_buffer_blocks_used"


def heavy(n: int, seed: int, images: int = 4) -> list[Ask]:
    """Requests of `images` 256x256 noise images each (an image: 64 vision rows, 64 KiB of rows)."""
    return [
        Ask(
            f"Compare these images ({i}).", tuple((256, 256, seed + images * i + k) for k in range(images)), 4
        )
        for i in range(n)
    ]


@dataclass
class Outcome:
    ask: Ask
    text: str | None
    error: Exception | None
    seconds: float


def ask_once(url: str, ask: Ask, timeout: float = 60.0) -> Outcome:
    t = time.monotonic()
    try:
        return Outcome(ask, chat(url, ask, timeout), None, time.monotonic() - t)
    except Exception as e:  # noqa: BLE001 - the outcome is what the tests judge
        return Outcome(ask, None, e, time.monotonic() - t)


def send_all(hub: NetnsThreads, url: str, asks: list[Ask]) -> list[Outcome]:
    """All at once, from the hub namespace."""
    futures = [hub.submit(ask_once, url, a) for a in asks]
    return [f.result() for f in futures]


class Traffic:
    """`clients` loops in the hub namespace sending `asks` round robin until the block ends."""

    def __init__(self, hub: NetnsThreads, url: str, asks: list[Ask], clients: int = 3) -> None:
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._loops = [hub.submit(self._loop, url, asks, i, clients) for i in range(clients)]

    def _loop(self, url: str, asks: list[Ask], i: int, step: int) -> None:
        while not self._stop.is_set():
            self.outcomes.append(ask_once(url, asks[i % len(asks)]))
            i += step

    def __enter__(self) -> Traffic:
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for f in self._loops:
            f.result(timeout=90)


def wait_until(cond: Callable[[], object], timeout: float, what: str, every: float = 0.05) -> float:
    """Seconds until `cond()` held; fails the test with `what` after `timeout`."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout:.0f}s: {what}")
        time.sleep(every)
    return time.monotonic() - t0


def assert_identical(cluster: Cluster, outcomes: list[Outcome]) -> None:
    """Every request answered, each exactly as the monolithic server answers it."""
    assert outcomes
    failed = [(o.ask.prompt, repr(o.error)) for o in outcomes if o.error is not None]
    assert not failed, f"{len(failed)}/{len(outcomes)} requests failed: {failed[:5]}"
    wrong = [
        (o.ask.prompt, o.text, cluster.expected(o.ask)) for o in outcomes if o.text != cluster.expected(o.ask)
    ]
    assert not wrong, f"disaggregated != monolithic: {wrong[:5]}"


def encoders(lang: Server) -> dict[str, dict]:
    """The language server's encoder pool, by URL (from GET /debug/engine)."""
    return {e["url"]: e for e in lang.debug()["encoders"]}


def wait_pool(lang: Server, healthy: list[str], timeout: float = 30) -> None:
    """Until exactly `healthy` are the healthy encoders of `lang`."""

    def now() -> list[str]:
        return sorted(u for u, e in encoders(lang).items() if e["healthy"])

    wait_until(lambda: now() == sorted(healthy), timeout, f"{lang.name} encoders {now()} -> {healthy}", 0.2)


def wait_pool_full(lang: Server, timeout: float) -> float:
    """Until no receive-buffer block is held (rooms released, aborted, expired, out of quarantine)."""
    return wait_until(
        lambda: lang.metric(BLOCKS_USED) == 0,
        timeout,
        f"{lang.name} receive pool back to full (transfer stats: {lang.debug()['transfer']})",
        0.2,
    )


@pytest.fixture
def spare_encoder(cluster: Cluster, net, hub, tiny_model_dir, logs):
    """Start an encoder in the enc3 namespace (flags given by the test); stopped afterwards."""
    started: list[Server] = []

    def start(*flags: str) -> Server:
        started.append(start_encoder(net.nodes["enc3"], tiny_model_dir, logs, hub, *flags))
        return started[-1]

    yield start
    for s in started:
        s.stop()
    wait_pool(cluster.growing, [cluster.encoders["enc1"].url])  # registrations gone: next test starts clean


@pytest.mark.parametrize("backend", BACKENDS)
def test_across_namespaces_outputs_equal_monolithic(cluster: Cluster, net, hub, backend):
    """1 language + 2 encoders, each in its own namespace: concurrent image requests complete, the
    greedy answers equal the monolithic server's, both encoders served, and the rows crossed the links."""
    lang = cluster.languages[backend]
    wait_pool(lang, [e.url for e in cluster.encoders.values()])
    before = {
        n: (e.metric(OK), e.metric("deepsplit_encode_vision_rows_total")) for n, e in cluster.encoders.items()
    }
    tx0 = {n: net.tx_bytes(net.nodes[n]) for n in cluster.encoders}

    assert_identical(cluster, send_all(hub, lang.url, BASE * 2))

    for n, e in cluster.encoders.items():
        served, rows = (
            e.metric(OK) - before[n][0],
            e.metric("deepsplit_encode_vision_rows_total") - before[n][1],
        )
        sent = net.tx_bytes(net.nodes[n]) - tx0[n]
        assert served > 0, f"{n} served no request"
        assert sent >= rows * ROW_BYTES > 0, f"{n}: {rows} vision rows but only {sent} bytes left its link"
    wait_pool_full(lang, TRANSFER_TTL_S)


@pytest.mark.parametrize("backend", BACKENDS)
def test_throttled_links(cluster: Cluster, net, hub, backend):
    """20 Mbit/s token buckets on enc1's and the language node's links: same answers, only slower."""
    lang, enc1 = cluster.languages[backend], net.nodes["enc1"]
    wait_pool(lang, [e.url for e in cluster.encoders.values()])
    with net.throttled([enc1, net.nodes["lang"]], "20mbit"):
        outcomes = send_all(hub, lang.url, BASE + heavy(4, seed=100))
        shaped = net.qdisc_bytes(enc1)
    assert_identical(cluster, outcomes)
    assert shaped > 64 * ROW_BYTES, f"only {shaped} bytes went through enc1's token bucket"
    wait_pool_full(lang, TRANSFER_TTL_S)


@pytest.mark.parametrize("backend", BACKENDS)
def test_link_cut_mid_transfer(cluster: Cluster, net, hub, backend):
    """enc1's link goes down while its rows are on the wire (2 Mbit/s): every request completes
    (retried on enc2) or fails with a clear 503, none hangs; the receive pool is full again (ZMQ:
    within the transfer TTL; Mooncake: once enc1's stalled writes returned); enc1 is back in rotation once its link is up, with nothing stuck in flight."""
    lang, enc1 = cluster.languages[backend], net.nodes["enc1"]
    urls = [e.url for e in cluster.encoders.values()]
    wait_pool(lang, urls)
    asks = heavy(8, seed=1000 + 100 * BACKENDS.index(backend))
    with net.throttled([enc1], "2mbit"):
        tx0 = net.tx_bytes(enc1)
        futures = [hub.submit(ask_once, lang.url, a) for a in asks]
        try:  # cut once ~100 kB of rows have left enc1 (a request's rows are ~256 kB)
            wait_until(lambda: net.tx_bytes(enc1) - tx0 > 100_000, 30, "rows flowing from enc1")
            inflight_at_cut = encoders(lang)[cluster.encoders["enc1"].url]["inflight"]
            net.link(enc1, up=False)
            outcomes = [f.result() for f in futures]
        finally:
            net.link(enc1, up=True)
    assert inflight_at_cut > 0, "the cut came when enc1 had nothing in flight"

    hung = [o.ask.prompt for o in outcomes if isinstance(o.error, openai.APITimeoutError)]
    assert not hung, f"requests hung until the client timeout: {hung}"
    for o in outcomes:
        if o.error is not None:
            assert isinstance(o.error, openai.APIStatusError) and o.error.status_code == 503, repr(o.error)
            assert "encod" in str(o.error) or "image rows" in str(o.error), repr(o.error)
        else:
            assert o.text == cluster.expected(o.ask)
    ok = sum(o.error is None for o in outcomes)
    assert ok * 2 >= len(outcomes), (
        f"only {ok}/{len(outcomes)} completed: {[repr(o.error) for o in outcomes]}"
    )

    # enc1's aborted pushes end too (ZMQ: at their deadline; Mooncake: only once TCP delivers the
    # write). ZMQ frees the rooms at once; Mooncake keeps them quarantined until enc1 reports back.
    enc1_server = cluster.encoders["enc1"]
    if backend == "zmq":
        wait_pool_full(lang, TRANSFER_TTL_S)
    wait_until(lambda: enc1_server.metric("deepsplit_encode_inflight") == 0, 60, "enc1 idle", 0.2)
    wait_pool_full(lang, TRANSFER_TTL_S)
    wait_pool(lang, urls)  # enc1 healthy again after its link came back
    assert_identical(cluster, send_all(hub, lang.url, BASE))  # and serving again, both encoders


def test_added_encoder_takes_load(cluster: Cluster, net, hub, spare_encoder):
    """The language server starts with enc1 alone; an encoder started mid-traffic registers itself
    (--register-with) and serves part of the requests; nothing is lost meanwhile."""
    lang, enc1 = cluster.growing, cluster.encoders["enc1"]
    wait_pool(lang, [enc1.url])
    with Traffic(hub, lang.url, BASE[:3] + heavy(3, seed=2000, images=2)) as traffic:
        wait_until(lambda: len(traffic.outcomes) >= 3, 30, "traffic on enc1 alone")
        enc3 = spare_encoder("--register-with", lang.url)
        enc3.wait_healthy()
        wait_until(lambda: enc3.metric(OK) >= 3, 30, "the added encoder served 3 requests", 0.2)
    pool = encoders(lang)
    assert pool[enc3.url]["served"] >= 3 and pool[enc1.url]["served"] > 0, pool
    assert_identical(cluster, traffic.outcomes)
    wait_pool_full(lang, TRANSFER_TTL_S)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_removed_encoder_loses_no_request(cluster: Cluster, net, hub, spare_encoder, sig):
    """A registered encoder is stopped (SIGTERM) or dies (SIGKILL) while it has requests in flight
    (its link throttled so rows take a while): every request completes, on enc1 if need be."""
    lang, enc1 = cluster.growing, cluster.encoders["enc1"]
    enc3 = spare_encoder("--register-with", lang.url).wait_healthy()
    wait_pool(lang, [enc1.url, enc3.url])
    with net.throttled([net.nodes["enc3"]], "4mbit"), Traffic(hub, lang.url, heavy(6, seed=3000)) as traffic:
        wait_until(lambda: encoders(lang)[enc3.url]["inflight"] > 0 and enc3.metric(OK) >= 1, 30, "enc3 busy")
        enc3.signal(sig)
        enc3.proc.wait(20)
        n = len(traffic.outcomes)
        wait_until(lambda: len(traffic.outcomes) >= n + 4, 60, "traffic goes on without enc3")
    assert_identical(cluster, traffic.outcomes)
    wait_pool(lang, [enc1.url])
    wait_pool_full(lang, TRANSFER_TTL_S)
