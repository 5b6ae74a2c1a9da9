"""Prometheus metrics of one language server, in a registry of its own (several apps per process is fine).

Counters and histograms are fed by the serving code; queue lengths, KV block usage and the receive
buffer pool are read at scrape time from the engine and the provider hook.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(
        self, stats: Callable[[], dict[str, int]], buffers: Callable[[], tuple[int, int] | None]
    ) -> None:
        r = self.registry = CollectorRegistry()
        p = "deepsplit_language_"
        self.requests = Counter(
            p + "requests", "finished HTTP generation requests", ["endpoint", "status"], registry=r
        )
        self.prompt_tokens = Counter(p + "prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "generated tokens", registry=r)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "arrival to first token", buckets=_LAT, registry=r
        )
        self.tpot = Histogram(
            p + "time_per_output_token_seconds", "mean gap between later tokens", buckets=_LAT, registry=r
        )
        self.e2e = Histogram(p + "request_latency_seconds", "arrival to last token", buckets=_LAT, registry=r)
        self.step = Histogram(p + "engine_step_seconds", "one engine step", buckets=_LAT, registry=r)
        self.errors = Counter(p + "errors", "requests answered with an error", ["status", "code"], registry=r)
        self.aborted = Counter(p + "aborted_requests", "requests aborted (client gone)", registry=r)
        for key, doc in [
            ("waiting", "requests queued for KV memory / a slot"),
            ("waiting_for_embeddings", "requests waiting for their vision rows"),
            ("running", "sequences in the running batch"),
            ("kv_blocks_used", "KV cache blocks held by sequences"),
            ("kv_blocks_total", "KV cache blocks in the pool"),
            ("preemptions", "sequences preempted so far (recompute)"),
            ("kv_blocks_cached", "KV cache blocks holding a prefix-cache key (held or free)"),
            ("prefix_cache_queried_tokens", "prompt tokens looked up in the prefix cache"),
            ("prefix_cache_hit_tokens", "prompt tokens whose K/V the prefix cache had"),
        ]:
            Gauge(p + key, doc, registry=r).set_function(lambda k=key: stats()[k])

        def buf(i: int) -> float:
            u = buffers()
            return float(u[i]) if u else 0.0

        Gauge(
            p + "mm_buffer_blocks_used", "multimodal receive-buffer blocks in use", registry=r
        ).set_function(lambda: buf(0))
        Gauge(p + "mm_buffer_blocks_total", "multimodal receive-buffer blocks", registry=r).set_function(
            lambda: buf(1)
        )
