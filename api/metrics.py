"""Prometheus metrics of one app (its own registry, so several apps in one process do not clash)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Latency buckets (seconds) from a cached thumbnail (~1 ms) to an LLM draft (~tens of seconds).
BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Request counts and latency per route template, index sizes and generations, reloads."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "medsearch_http_requests", "HTTP requests by route template, method and status.",
            ["route", "method", "status"], registry=r,
        )  # fmt: skip
        self.latency = Histogram(
            "medsearch_http_request_duration_seconds", "HTTP request latency by route template.",
            ["route", "method"], buckets=BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("medsearch_http_requests_in_flight", "Requests being served now.", registry=r)
        self.index_vectors = Gauge("medsearch_index_vectors", "Vectors in the loaded index.", ["space"], registry=r)
        self.index_generation = Gauge(
            "medsearch_index_generation", "Generation of the loaded index.", ["space"], registry=r
        )
        self.reloads = Counter("medsearch_index_reloads", "Index hot-swap attempts.", ["result"], registry=r)
        self.rate_limited = Counter("medsearch_rate_limited", "Requests refused by the rate limit.", registry=r)
        self.search_hits = Histogram(
            "medsearch_search_hits", "Hits returned per search.", ["kind"],
            buckets=(0, 1, 5, 10, 20, 50, 100), registry=r,
        )  # fmt: skip

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route, method=method).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
