"""Prometheus metrics, one `CollectorRegistry` per app (so tests can build many apps in one process).

The HTTP layer counts requests and their latency by route template (never by raw path, so adapter
names do not multiply the series); the engine, handed the same `Metrics`, counts adapter loads, cache
hits and misses by tier, merges by kind, batch sizes and forward time. `GET /metrics` renders them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Metrics", "MetricsMiddleware", "CONTENT_TYPE_LATEST"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        # HTTP
        self.requests = Counter("lora_http_requests", "HTTP requests by method, route template and status",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("lora_http_request_seconds", "HTTP request latency (until the last byte)",
                                         ["method", "route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("lora_http_requests_in_flight", "HTTP requests being served", registry=r)
        # adapters and their cache tiers (tier: disk | host | device)
        self.adapter_loads = Counter("lora_adapter_loads", "Adapters loaded into a cache tier", ["tier"], registry=r)
        self.cache_hits = Counter("lora_adapter_cache_hits", "Adapter cache hits", ["tier"], registry=r)
        self.cache_misses = Counter("lora_adapter_cache_misses", "Adapter cache misses", ["tier"], registry=r)
        self.stale_served = Counter("lora_adapter_stale_served", "Requests served from a held copy of an adapter "
                                    "while the index was unreachable", ["tier"], registry=r)
        self.uploads = Counter("lora_adapter_uploads", "Adapter uploads and compositions by outcome",
                               ["outcome"], registry=r)
        # merged mode
        self.merges = Counter("lora_merges", "Weight changes: merge, unmerge or switch", ["kind"], registry=r)
        self.merge_mode = Gauge("lora_merged", "1 while an adapter is merged into the base weights", registry=r)
        # the batching loop
        self.batch_size = Histogram("lora_batch_size", "Requests per forward batch", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.forward_seconds = Histogram("lora_forward_seconds",
                                         "Time per batch forward (generation: per decoding step)",
                                         buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Pure ASGI, so streamed responses (SSE) and streamed uploads pass through untouched."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 500
        wrapped: Callable = send

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await wrapped(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            # A client can send any method name: only the standard ones become label values.
            method = scope["method"] if scope["method"] in _METHODS else "other"
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.request_seconds.labels(method, route).observe(time.perf_counter() - started)
