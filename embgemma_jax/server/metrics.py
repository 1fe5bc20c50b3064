"""Prometheus metrics of one server (its own registry, served at ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# Powers of two up to 4096 (texts or requests per device call).
_COUNT_BUCKETS = tuple(float(2**i) for i in range(13))
_TOKEN_BUCKETS = tuple(float(2**i) for i in range(4, 21))
_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """The counters, gauges and histograms of one server, prefixed ``embgemma_``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "embgemma_requests", "HTTP requests answered, by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "embgemma_request_duration_seconds",
            "Time from request to answer, by route (embedding routes only)",
            ["route"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.inputs = Counter("embgemma_inputs", "Texts embedded", registry=r)
        self.tokens = Counter("embgemma_tokens", "Tokens embedded (prompt, BOS and EOS included)", registry=r)
        self.truncated = Counter("embgemma_truncated_inputs", "Inputs truncated to the model's window", registry=r)
        self.queue_depth = Gauge("embgemma_queue_depth", "Requests waiting for the device", registry=r)
        self.in_flight = Gauge("embgemma_in_flight_requests", "Requests admitted and not yet answered", registry=r)
        self.queue_seconds = Histogram(
            "embgemma_queue_seconds",
            "Time a request waits before its batch starts",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_seconds = Histogram(
            "embgemma_batch_seconds", "Time of one device call (one encode)", buckets=_SECONDS_BUCKETS, registry=r
        )
        self.batch_requests = Histogram(
            "embgemma_batch_requests", "Requests coalesced into one device call", buckets=_COUNT_BUCKETS, registry=r
        )
        self.batch_texts = Histogram(
            "embgemma_batch_texts", "Texts in one device call", buckets=_COUNT_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "embgemma_batch_tokens", "Tokens (unpadded) in one device call", buckets=_TOKEN_BUCKETS, registry=r
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
