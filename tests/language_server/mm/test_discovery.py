"""Encoder discovery: DNS names (injected resolver, one real lookup), self-registration with TTL
(injected clock), the registration routes over ASGI, and the union handed to the pool."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request

from language_server.mm.discovery import (
    DnsDiscovery,
    EncoderDiscovery,
    EncoderRegistry,
    register_with,
    registration_router,
    resolve_addresses,
    split_host_port,
)
from language_server.mm.encoder_pool import EncoderPool

SVC = "deepsplit-encode-headless.ns.svc.cluster.local:31000"


class FakeDNS:
    """host -> list of IPs, or an exception to raise; records every lookup."""

    def __init__(self, table: dict) -> None:
        self.table, self.calls = table, []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append((host, port))
        answer = self.table[host]
        if isinstance(answer, Exception):
            raise answer
        return answer


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_names_parse_and_urls_cover_ipv4_and_ipv6():
    assert split_host_port(SVC) == ("deepsplit-encode-headless.ns.svc.cluster.local", 31000)
    assert split_host_port("[fd00::7]:31000") == ("fd00::7", 31000)
    with pytest.raises(ValueError):
        split_host_port("no-port")
    seen = []
    dns = DnsDiscovery(["svc:31000"], seen.append, resolver=FakeDNS({"svc": ["10.0.0.2", "fd00::7"]}))
    assert dns.refresh() == ["http://10.0.0.2:31000", "http://[fd00::7]:31000"]
    assert seen == [dns.urls]


def test_refreshes_add_and_remove_and_keep_static_urls_first():
    dns_table = {"svc": ["10.0.0.1"]}
    seen: list[list[str]] = []
    dns = DnsDiscovery(
        ["svc:31000"], seen.append, static_urls=["http://static:1"], resolver=FakeDNS(dns_table)
    )
    assert dns.refresh() == ["http://static:1", "http://10.0.0.1:31000"]
    dns_table["svc"] = ["10.0.0.1", "10.0.0.2"]  # a pod became ready
    assert dns.refresh() == ["http://static:1", "http://10.0.0.1:31000", "http://10.0.0.2:31000"]
    dns.refresh()  # no change: no callback
    dns_table["svc"] = ["10.0.0.2"]  # a pod went away
    assert dns.refresh() == ["http://static:1", "http://10.0.0.2:31000"]
    assert len(seen) == 3 and seen[-1] == dns.urls


def test_failed_resolution_keeps_the_last_good_set_and_logs_once(caplog):
    dns_table = {"a": ["10.0.0.1"], "b": ["10.0.1.1"]}
    seen: list[list[str]] = []
    dns = DnsDiscovery(["a:1", "b:2"], seen.append, resolver=FakeDNS(dns_table))
    good = dns.refresh()
    dns_table["a"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    with caplog.at_level("WARNING"):
        assert dns.refresh() == good
        assert dns.refresh() == good
    assert sum("encoder DNS a:1 failed" in r.message for r in caplog.records) == 1
    dns_table["a"] = ["10.0.0.9"]  # recovers with a new address
    assert dns.refresh() == ["http://10.0.0.9:1", "http://10.0.1.1:2"]
    assert len(seen) == 2


def test_a_name_that_never_resolved_contributes_nothing():
    dns = DnsDiscovery(["gone:1"], lambda _: None, ["http://s:1"], resolver=FakeDNS({"gone": OSError("x")}))
    assert dns.refresh() == ["http://s:1"]


def test_real_resolution_of_localhost():
    assert "127.0.0.1" in resolve_addresses("localhost", 31000)
    dns = DnsDiscovery(["localhost:31000"], lambda _: None)
    assert "http://127.0.0.1:31000" in asyncio.run(dns.refresh_async())


def test_registry_expires_unrenewed_encoders():
    clock, seen = Clock(), []
    reg = EncoderRegistry(seen.append, clock=clock, max_ttl_s=60)
    reg.register("http://e1:31000/", 10)
    reg.register("http://e2:31000", 30)
    assert reg.urls() == ["http://e1:31000", "http://e2:31000"]
    clock.t += 8
    reg.register("http://e1:31000", 10)  # renewal: no change reported
    assert len(seen) == 2
    clock.t += 9  # e1 renewed at +8 lives to +18; e2 to +30
    assert reg.expire() == [] and reg.urls() == ["http://e1:31000", "http://e2:31000"]
    clock.t += 2
    assert reg.expire() == ["http://e1:31000"] and seen[-1] == ["http://e2:31000"]
    assert reg.expire(now=clock.t + 100) == ["http://e2:31000"] and reg.urls() == []
    assert reg.register("http://e3:1", 1e6) == 60  # capped
    assert reg.unregister("http://e3:1") and not reg.unregister("http://e3:1")
    with pytest.raises(ValueError):
        reg.register("http://e4:1", 0)


def _app(registry: EncoderRegistry, api_key: str | None = None) -> FastAPI:
    async def check_key(request: Request) -> None:
        if api_key and request.headers.get("authorization") != f"Bearer {api_key}":
            raise HTTPException(401, "bad key")

    app = FastAPI()
    app.include_router(registration_router(registry, dependencies=[Depends(check_key)]))
    return app


def test_registration_routes_over_http():
    clock = Clock()
    reg = EncoderRegistry(clock=clock, max_ttl_s=120)

    async def main():
        transport = httpx.ASGITransport(app=_app(reg, api_key="k"))
        async with httpx.AsyncClient(transport=transport, base_url="http://lang") as c:
            assert (await c.post("/v1/encoders/register", json={"url": "http://e:1"})).status_code == 401
            granted = await register_with(c, "http://lang", "http://10.0.0.5:31000", 30, api_key="k")
            assert granted == 30 and reg.urls() == ["http://10.0.0.5:31000"]
            r = await c.post(
                "/v1/encoders/register", json={"url": "http://e:1", "ttl_s": 999}, headers=_key("k")
            )
            assert r.json() == {"url": "http://e:1", "ttl_s": 120}
            for bad in (
                {"url": "ftp://e:1"},
                {"url": "http://e:1/v1"},
                {"url": "http://e:1", "ttl_s": -1},
                {},
            ):
                r = await c.post("/v1/encoders/register", json=bad, headers=_key("k"))
                assert r.status_code == 422, bad
            clock.t += 10
            listing = (await c.get("/v1/encoders", headers=_key("k"))).json()["encoders"]
            assert listing == [
                {"url": "http://10.0.0.5:31000", "expires_in_s": 20.0},
                {"url": "http://e:1", "expires_in_s": 110.0},
            ]
            r = await c.post("/v1/encoders/unregister", json={"url": "http://e:1"}, headers=_key("k"))
            assert r.json() == {"url": "http://e:1", "removed": True} and reg.urls() == [
                "http://10.0.0.5:31000"
            ]

    asyncio.run(main())


def _key(k: str) -> dict:
    return {"authorization": f"Bearer {k}"}


async def _until(cond, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def test_discovery_feeds_the_pool_the_union_and_drops_lapsed_registrations():
    clock, dns_table = Clock(), {"svc": ["10.0.0.1"]}

    async def main():
        pool = EncoderPool(["http://static:1"], transport=httpx.MockTransport(lambda r: httpx.Response(200)))
        reg = EncoderRegistry(clock=clock)
        disc = EncoderDiscovery(
            pool.set_urls,
            static_urls=["http://static:1"],
            dns_names=["svc:31000"],
            dns_interval_s=0.01,
            registry=reg,
            expiry_interval_s=0.01,
            resolver=FakeDNS(dns_table),
        )
        await disc.start()
        try:
            assert list(pool.encoders) == ["http://static:1", "http://10.0.0.1:31000"]
            reg.register("http://10.9.9.9:31000", ttl_s=5)
            assert list(pool.encoders)[-1] == "http://10.9.9.9:31000"
            dns_table["svc"] = ["10.0.0.2"]
            want = ["http://static:1", "http://10.0.0.2:31000", "http://10.9.9.9:31000"]
            await _until(lambda: disc.current == want)  # the DNS loop picked up the change
            assert set(pool.encoders) == set(want)
            clock.t += 6
            await _until(lambda: disc.current == want[:2])  # the expiry loop dropped the lapsed one
            assert set(pool.encoders) == set(want[:2])
        finally:
            await disc.close()
            await pool.close()

    asyncio.run(main())
