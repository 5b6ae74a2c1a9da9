"""Where the language server's encoders come from beyond the static list: DNS names resolved
periodically (a Kubernetes headless Service gives one A/AAAA record per ready pod), and encoders that
register themselves over HTTP with a TTL they must renew.

`EncoderDiscovery` merges static + DNS + registered URLs and hands the union to a callback
(`EncoderPool.set_urls`) whenever it changes. Health and load are the pool's business, not this one's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence

import httpx
from fastapi import APIRouter
from pydantic import BaseModel, Field, field_validator

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], list[str]]  # (host, port) -> IP addresses; raises OSError on failure


def resolve_addresses(host: str, port: int) -> list[str]:
    """Every A/AAAA address of `host` (blocking: call it in a thread)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


def split_host_port(name: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' (an http:// prefix is tolerated)."""
    rest = name.split("://", 1)[-1].rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"encoder DNS name {name!r} is not host:port")
    return host.strip("[]"), int(port)


def ip_url(ip: str, port: int, scheme: str = "http") -> str:
    return f"{scheme}://[{ip}]:{port}" if ":" in ip else f"{scheme}://{ip}:{port}"


def merge_urls(*lists: Iterable[str]) -> list[str]:
    """Order-preserving union, trailing slashes dropped."""
    return list(dict.fromkeys(u.rstrip("/") for urls in lists for u in urls if u))


class DnsDiscovery:
    """Resolve `names` ('host:port') every `interval_s`; `on_change(static + resolved)` when it changes.

    A name that fails to resolve keeps its last good addresses (logged once until it recovers).
    """

    def __init__(
        self,
        names: Sequence[str],
        on_change: Callable[[list[str]], None],
        static_urls: Sequence[str] = (),
        interval_s: float = 10.0,
        resolver: Resolver = resolve_addresses,
        scheme: str = "http",
    ) -> None:
        self.targets = [split_host_port(n) for n in names]
        self.on_change, self.static_urls = on_change, list(static_urls)
        self.interval_s, self.resolver, self.scheme = interval_s, resolver, scheme
        self.resolved: dict[tuple[str, int], list[str]] = {}  # last good URLs per name
        self.failing: set[tuple[str, int]] = set()
        self.urls: list[str] | None = None  # last union handed to on_change
        self._task: asyncio.Task | None = None

    def resolve_all(self) -> dict[tuple[str, int], list[str] | Exception]:
        """Blocking lookups; no state is touched, so this may run in a thread."""
        out: dict[tuple[str, int], list[str] | Exception] = {}
        for host, port in self.targets:
            try:
                out[(host, port)] = [ip_url(ip, port, self.scheme) for ip in self.resolver(host, port)]
            except (OSError, UnicodeError) as e:
                out[(host, port)] = e
        return out

    def apply(self, results: dict[tuple[str, int], list[str] | Exception]) -> list[str]:
        for target, result in results.items():
            if isinstance(result, Exception):
                if target not in self.failing:
                    self.failing.add(target)
                    kept = len(self.resolved.get(target, []))
                    log.warning(
                        "encoder DNS %s:%d failed (%s); keeping %d address(es)", *target, result, kept
                    )
                continue
            if target in self.failing:
                self.failing.discard(target)
                log.info("encoder DNS %s:%d resolves again", *target)
            self.resolved[target] = result
        urls = merge_urls(self.static_urls, *(self.resolved.get(t, []) for t in self.targets))
        if urls != self.urls:
            self.urls = urls
            self.on_change(urls)
        return urls

    def refresh(self) -> list[str]:
        return self.apply(self.resolve_all())

    async def refresh_async(self) -> list[str]:
        return self.apply(await asyncio.to_thread(self.resolve_all))

    async def start(self) -> None:
        await self.refresh_async()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh_async()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("encoder DNS refresh")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()


class EncoderRegistry:
    """Encoders that announced themselves; each lapses `ttl_s` after its last registration."""

    def __init__(
        self,
        on_change: Callable[[list[str]], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_ttl_s: float = 600.0,
    ) -> None:
        self.on_change, self.clock, self.max_ttl_s = on_change, clock, max_ttl_s
        self.expires: dict[str, float] = {}  # url -> deadline on `clock`

    def register(self, url: str, ttl_s: float) -> float:
        """Add or renew `url`; returns the TTL granted (capped at `max_ttl_s`)."""
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        ttl_s = min(ttl_s, self.max_ttl_s)
        url = url.rstrip("/")
        new = url not in self.expires
        self.expires[url] = self.clock() + ttl_s
        if new:
            log.info("encoder %s registered (ttl %.0fs)", url, ttl_s)
            self._changed()
        return ttl_s

    def unregister(self, url: str) -> bool:
        if self.expires.pop(url.rstrip("/"), None) is None:
            return False
        log.info("encoder %s unregistered", url)
        self._changed()
        return True

    def expire(self, now: float | None = None) -> list[str]:
        now = self.clock() if now is None else now
        gone = [u for u, deadline in self.expires.items() if deadline <= now]
        for u in gone:
            del self.expires[u]
            log.warning("encoder %s dropped: registration not renewed", u)
        if gone:
            self._changed()
        return gone

    def urls(self) -> list[str]:
        return list(self.expires)

    def _changed(self) -> None:
        if self.on_change:
            self.on_change(self.urls())


class EncoderURL(BaseModel):
    url: str = Field(description="base URL the language server should call, e.g. http://10.1.2.3:31000")

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        u = httpx.URL(v)
        if u.scheme not in ("http", "https") or not u.host or u.path not in ("", "/") or u.query:
            raise ValueError("url must be http(s)://host[:port] with no path")
        return v.rstrip("/")


class Registration(EncoderURL):
    ttl_s: float = Field(30.0, gt=0, description="dropped unless renewed within this many seconds")


def registration_router(registry: EncoderRegistry, dependencies: Sequence = ()) -> APIRouter:
    """POST /v1/encoders/register {url, ttl_s} (add or renew), POST /v1/encoders/unregister {url},
    GET /v1/encoders (registered URLs and seconds left). `dependencies`: e.g. the API-key check."""
    router = APIRouter(prefix="/v1/encoders", dependencies=list(dependencies))

    @router.post("/register")
    async def register(body: Registration) -> dict:
        granted = registry.register(body.url, body.ttl_s)
        return {"url": body.url, "ttl_s": granted}

    @router.post("/unregister")
    async def unregister(body: EncoderURL) -> dict:
        return {"url": body.url, "removed": registry.unregister(body.url)}

    @router.get("")
    async def listing() -> dict:
        now = registry.clock()
        return {
            "encoders": [{"url": u, "expires_in_s": round(t - now, 3)} for u, t in registry.expires.items()]
        }

    return router


async def register_with(
    client: httpx.AsyncClient, language_url: str, self_url: str, ttl_s: float, api_key: str | None = None
) -> float:
    """The encoder's side: announce (or renew) `self_url` at one language server; returns the TTL granted.
    Call it again well within the TTL (e.g. every ttl_s / 3)."""
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    r = await client.post(
        f"{language_url.rstrip('/')}/v1/encoders/register",
        json={"url": self_url, "ttl_s": ttl_s},
        headers=headers,
    )
    r.raise_for_status()
    return float(r.json()["ttl_s"])


class EncoderDiscovery:
    """Static + DNS + registered encoders -> `set_urls(union)`, kept current while started."""

    def __init__(
        self,
        set_urls: Callable[[list[str]], None],
        static_urls: Sequence[str] = (),
        dns_names: Sequence[str] = (),
        dns_interval_s: float = 10.0,
        registry: EncoderRegistry | None = None,
        expiry_interval_s: float = 1.0,
        resolver: Resolver = resolve_addresses,
    ) -> None:
        self.set_urls, self.static_urls = set_urls, list(static_urls)
        self.registry, self.expiry_interval_s = registry, expiry_interval_s
        self.dns = None
        if dns_names:
            self.dns = DnsDiscovery(dns_names, self._publish, static_urls, dns_interval_s, resolver)
        if registry is not None:
            registry.on_change = self._publish
        self._task: asyncio.Task | None = None
        self.current: list[str] | None = None  # last union handed to set_urls

    def _publish(self, _urls: list[str] | None = None) -> None:
        dns_urls = (self.dns.urls or []) if self.dns else self.static_urls
        urls = merge_urls(self.static_urls, dns_urls, self.registry.urls() if self.registry else [])
        if urls != self.current:
            self.current = urls
            self.set_urls(urls)

    async def start(self) -> None:
        if self.dns:
            await self.dns.start()
        self._publish()
        if self.registry is not None:
            self._task = asyncio.create_task(self._expire_loop())

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(self.expiry_interval_s)
            try:
                self.registry.expire()
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("encoder registry expiry")

    async def close(self) -> None:
        if self.dns:
            await self.dns.close()
        if self._task:
            self._task.cancel()
