"""Prometheus metrics of one runtime, in a registry of its own (no global prometheus state).

Two sources, merged at scrape time:

- the scheduler's `Stats` (monotonic token and event counters, gauges of KV memory and queues),
  fetched once per scrape and exposed through `StatsCollector`, so the counters are exactly the
  scheduler's and never drift from it;
- what the runtime loop sees when it finalises a request (from a ZMQ client or over HTTP alike):
  time to first token, end-to-end latency and the finish reason the client was given (a stop
  string is a "stop" here, while the scheduler sees it as an abort).

The loop thread observes; the HTTP thread scrapes. prometheus_client's metric objects are
thread-safe, and `render` holds a lock while it swaps in the scrape's `Stats`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from radixkv.protocol import GenerateResult, Stats

PREFIX = "radixkv"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# (Stats field, metric name without the prefix, help)
COUNTERS = (
    ("requests", "scheduler_requests", "Requests the scheduler accepted."),
    ("prompt_tokens", "prompt_tokens", "Prompt tokens of admitted requests."),
    ("cached_tokens", "cached_prompt_tokens", "Prompt tokens served by the radix cache (hits)."),
    ("generated_tokens", "generated_tokens", "Tokens generated."),
    ("evicted_tokens", "evicted_tokens", "KV slots freed by evicting radix-tree leaves."),
    ("retractions", "retractions", "Running requests retracted under memory pressure."),
)
GAUGES = (
    ("kv_capacity", "kv_capacity_tokens", "KV cache capacity in tokens."),
    ("kv_used", "kv_used_tokens", "KV slots in use and not evictable (running requests)."),
    ("evictable", "evictable_tokens", "Tokens in the radix tree that no request holds."),
    ("protected", "protected_tokens", "Tokens in the radix tree locked by running requests."),
    ("running", "running_requests", "Requests running (in the batch)."),
    ("waiting", "waiting_requests", "Requests waiting for admission."),
)


class StatsCollector(Collector):
    """Exposes the `Stats` of the current scrape (nothing before the first one)."""

    def __init__(self) -> None:
        self.stats: Stats | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        if s is None:
            return
        for field, name, doc in COUNTERS:
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=getattr(s, field))
        for field, name, doc in GAUGES:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=getattr(s, field))
        yield GaugeMetricFamily(
            f"{PREFIX}_kv_usage_ratio",
            "kv_used / kv_capacity: the share of the KV cache that cannot be freed now.",
            value=s.kv_used / s.kv_capacity if s.kv_capacity else 0.0,
        )


class RuntimeMetrics:
    """The runtime's metrics: `observe_*` from the runtime loop, `render(stats)` per scrape."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._stats = StatsCollector()
        self._lock = threading.Lock()
        self.registry.register(self._stats)
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Seconds from a request's arrival at the runtime to its first token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{PREFIX}_e2e_request_latency_seconds",
            "Seconds from a request's arrival at the runtime to its last token.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            f"{PREFIX}_requests_finished",
            "Generate requests finished, by the finish reason their client got "
            "(stop, length, abort, or error when refused).",
            ["reason"],
            registry=self.registry,
        )

    def observe_result(self, result: GenerateResult) -> None:
        """A request finished with a result (any finish reason). Aborted requests count by
        reason but stay out of the latency histograms: their latency is when they were given up,
        not how long serving took."""
        self.finished.labels(result.finish_reason).inc()
        if result.finish_reason == "abort":
            return
        if result.meta.completion_tokens:
            self.ttft.observe(result.meta.ttft)
        self.latency.observe(result.meta.latency)

    def observe_end(self, reason: str) -> None:
        """A request ended without a result: "abort" (its client left) or "error" (refused)."""
        self.finished.labels(reason).inc()

    def render(self, stats: Stats) -> bytes:
        """The Prometheus text exposition, with `stats` as the scheduler's counters and gauges."""
        with self._lock:
            self._stats.stats = stats
            return generate_latest(self.registry)
