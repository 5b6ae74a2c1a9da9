"""Prometheus metrics of one encode server (its own registry, exported at GET /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class EncodeMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "deepsplit_encode_requests", "encode requests by outcome", ["status"], registry=r
        )
        self.images = Counter("deepsplit_encode_images", "images encoded (cache hits included)", registry=r)
        self.vision_rows = Counter("deepsplit_encode_vision_rows", "vision rows written", registry=r)
        self.encode_latency = Histogram(
            "deepsplit_encode_compute_seconds", "request received -> rows computed", buckets=_LAT, registry=r
        )
        self.total_latency = Histogram(
            "deepsplit_encode_total_seconds", "request received -> rows written", buckets=_LAT, registry=r
        )
        self.inflight = Gauge("deepsplit_encode_inflight", "encode requests in progress", registry=r)
        self.cache_hits = Gauge("deepsplit_encode_cache_hits", "embedding cache hits", registry=r)
        self.cache_misses = Gauge("deepsplit_encode_cache_misses", "embedding cache misses", registry=r)
        self.cache_bytes = Gauge(
            "deepsplit_encode_cache_bytes", "bytes held by the embedding cache", registry=r
        )
        self.vision_batches = Gauge(
            "deepsplit_encode_vision_batches", "batched vision forwards run", registry=r
        )

    def observe(self, encoded, encode_s: float, total_s: float) -> None:
        self.requests.labels("ok").inc()
        self.images.inc(encoded.num_images)
        self.vision_rows.inc(int(encoded.embeds.shape[0]))
        self.encode_latency.observe(encode_s)
        self.total_latency.observe(total_s)

    def refresh(self, service) -> None:
        cache = service.encoder.cache
        self.cache_hits.set(cache.hits)
        self.cache_misses.set(cache.misses)
        self.cache_bytes.set(cache.bytes)
        self.vision_batches.set(service.encoder.batcher.batches)
        self.inflight.set(service.inflight)
