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
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from radixkv.protocol import GenerateResult, Stats

PREFIX = "radixkv"
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# (Stats field, our name without the prefix, SGLang's name, vLLM's name, help); None: no such
# name there. Counters get prometheus' `_total` suffix.
COUNTERS = (
    ("requests", "scheduler_requests", None, None, "Requests the scheduler accepted."),
    ("prompt_tokens", "prompt_tokens", "sglang:prompt_tokens", "vllm:prompt_tokens",
     "Prompt tokens of admitted requests."),
    ("cached_tokens", "cached_prompt_tokens", "sglang:cached_tokens", "vllm:prefix_cache_hits",
     "Prompt tokens served by the radix cache (hits)."),
    ("prompt_tokens", None, None, "vllm:prefix_cache_queries",
     "Prompt tokens looked up in the prefix cache (every prompt token)."),
    ("generated_tokens", "generated_tokens", "sglang:generation_tokens",
     "vllm:generation_tokens", "Tokens generated."),
    ("evicted_tokens", "evicted_tokens", None, None,
     "KV slots freed by evicting radix-tree leaves."),
    ("demoted_tokens", "demoted_tokens", None, None,
     "Cached tokens of closed sessions marked to be evicted before any other."),
    ("retractions", "retractions", None, None, "Running requests retracted under memory pressure."),
    ("prefill_steps", "prefill_steps", None, None, "Prefill (extend) batches run."),
    ("raised_prefill_steps", "raised_prefill_steps", None, None,
     "Prefill batches whose token budget --ttft-target raised to compute late prompts at once."),
    ("tier_hit_tokens", "kv_tier_hit_tokens", None, None,
     "Prompt tokens served from the host KV tier (--kv-host-tier; also counted as cached)."),
    ("tier_load_seconds", "kv_tier_load_seconds", None, None,
     "Seconds spent copying KV back from the host tier."),
    ("tier_stored_tokens", "kv_tier_stored_tokens", None, None,
     "Tokens of evicted prefixes written into the host tier."),
    ("storage_hit_tokens", "kv_storage_hit_tokens", None, None,
     "Prompt tokens read back from --kv-storage-dir (also counted as cached)."),
    ("storage_stored_tokens", "kv_storage_stored_tokens", None, None,
     "Tokens written to --kv-storage-dir."),
    ("storage_corrupt_blocks", "kv_storage_corrupt_blocks", None, None,
     "Blocks in --kv-storage-dir found corrupt or truncated (skipped, removed)."),
    ("storage_evicted_blocks", "kv_storage_evicted_blocks", None, None,
     "Blocks removed from --kv-storage-dir to stay under --kv-storage-size."),
)  # fmt: skip
GAUGES = (
    ("kv_capacity", "kv_capacity_tokens", "sglang:max_total_num_tokens", None,
     "KV cache capacity in tokens."),
    ("kv_used", "kv_used_tokens", None, None,
     "KV slots in use and not evictable (running requests)."),
    ("evictable", "evictable_tokens", None, None,
     "Tokens in the radix tree that no request holds."),
    ("protected", "protected_tokens", None, None,
     "Tokens in the radix tree locked by running requests."),
    ("running", "running_requests", "sglang:num_running_reqs", "vllm:num_requests_running",
     "Requests running (in the batch)."),
    ("waiting", "waiting_requests", "sglang:num_queue_reqs", "vllm:num_requests_waiting",
     "Requests waiting for admission."),
    ("tier_tokens", "kv_tier_tokens", None, None, "Tokens held in the host KV tier."),
    ("tier_capacity", "kv_tier_capacity_tokens", None, None, "Host KV tier capacity in tokens."),
)  # fmt: skip
# (our name, SGLang's, vLLM's, help, buckets)
HISTOGRAMS = {
    "ttft": ("time_to_first_token_seconds", "sglang:time_to_first_token_seconds",
             "vllm:time_to_first_token_seconds",
             "Seconds from a request's arrival at the runtime to its first token.", TTFT_BUCKETS),
    "latency": ("e2e_request_latency_seconds", "sglang:e2e_request_latency_seconds",
                "vllm:e2e_request_latency_seconds",
                "Seconds from a request's arrival at the runtime to its last token.",
                LATENCY_BUCKETS),
    "itl": ("inter_token_latency_seconds", "sglang:inter_token_latency_seconds",
            "vllm:inter_token_latency_seconds",
            "Seconds between a request's consecutive tokens (per token).", ITL_BUCKETS),
    "queue": ("queue_time_seconds", "sglang:queue_time_seconds", "vllm:request_queue_time_seconds",
              "Seconds a request waited in the scheduler for its first admission.", TTFT_BUCKETS),
}  # fmt: skip


class StatsCollector(Collector):
    """Exposes the `Stats` of the current scrape (nothing before the first one), under our names
    and those SGLang's and vLLM's dashboards read."""

    def __init__(self) -> None:
        self.stats: Stats | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        if s is None:
            return
        for table, family in ((COUNTERS, CounterMetricFamily), (GAUGES, GaugeMetricFamily)):
            for field, ours, sglang, vllm, doc in table:
                value = getattr(s, field)
                for name in (f"{PREFIX}_{ours}" if ours else None, sglang, vllm):
                    if name is not None:
                        yield family(name, doc, value=value)
        usage = s.kv_used / s.kv_capacity if s.kv_capacity else 0.0
        doc = "kv_used / kv_capacity: the share of the KV cache that cannot be freed now."
        for name in (f"{PREFIX}_kv_usage_ratio", "sglang:token_usage", "vllm:kv_cache_usage_perc"):
            yield GaugeMetricFamily(name, doc, value=usage)
        doc = "cached_tokens / prompt_tokens since start."
        yield GaugeMetricFamily("sglang:cache_hit_rate", doc, value=s.hit_rate)
        if s.workers:
            yield from _worker_metrics(s)


# behind a router: (WorkerStats field or Stats field, metric name, help), one sample per worker
WORKER_GAUGES = (
    ("alive", "worker_up", "1 while the worker is in the router's rotation."),
    ("in_flight", "worker_in_flight_requests", "Requests the router has in flight there."),
    ("routed", "worker_routed_requests", "Requests the router sent there since it started."),
)
WORKER_STATS = (
    ("prompt_tokens", "worker_prompt_tokens", "Prompt tokens of requests it admitted."),
    ("cached_tokens", "worker_cached_prompt_tokens", "Prompt tokens its radix cache served."),
    ("kv_used", "worker_kv_used_tokens", "KV slots in use and not evictable there."),
    ("running", "worker_running_requests", "Requests running there."),
    ("waiting", "worker_waiting_requests", "Requests waiting for admission there."),
)


def _worker_metrics(s: Stats) -> Iterator[Metric]:
    """Per-worker gauges, labelled by the worker's endpoint."""
    for field, name, doc in WORKER_GAUGES:
        family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["worker"])
        for w in s.workers:
            family.add_metric([w.worker], float(getattr(w, field)))
        yield family
    for field, name, doc in WORKER_STATS:
        family = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["worker"])
        for w in s.workers:
            if w.stats is not None:
                family.add_metric([w.worker], float(getattr(w.stats, field)))
        yield family
    family = GaugeMetricFamily(f"{PREFIX}_worker_cache_hit_rate",
                               "cached / prompt tokens of the worker since it started.",
                               labels=["worker"])  # fmt: skip
    for w in s.workers:
        if w.stats is not None:
            family.add_metric([w.worker], w.stats.hit_rate)
    yield family


class RuntimeMetrics:
    """The runtime's metrics: `observe_*` from the runtime loop, `render(stats)` per scrape.
    Each histogram is kept under our name, SGLang's and vLLM's (the same observations)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._stats = StatsCollector()
        self._lock = threading.Lock()
        self.registry.register(self._stats)
        self._histograms = {
            key: [
                Histogram(name, doc, buckets=buckets, registry=self.registry)
                for name in (f"{PREFIX}_{ours}", sglang, vllm)
            ]
            for key, (ours, sglang, vllm, doc, buckets) in HISTOGRAMS.items()
        }
        self.finished = Counter(
            f"{PREFIX}_requests_finished",
            "Generate requests finished, by the finish reason their client got "
            "(stop, length, abort, or error when refused).",
            ["reason"],
            registry=self.registry,
        )
        # (open sessions, tokens they hold), read at each scrape (the endpoint sets it)
        self.sessions: Callable[[], tuple[int, int]] | None = None
        self.open_sessions = Gauge(f"{PREFIX}_open_sessions",
                                   "Sessions open now (/open_session; --max-sessions bounds them).",
                                   registry=self.registry)  # fmt: skip
        self.session_tokens = Gauge(f"{PREFIX}_session_tokens",
                                    "Tokens the open sessions' requests hold (inputs, outputs).",
                                    registry=self.registry)  # fmt: skip

    def _observe(self, key: str, value: float) -> None:
        for histogram in self._histograms[key]:
            histogram.observe(value)

    def observe_result(self, result: GenerateResult) -> None:
        """A request finished with a result (any finish reason). Aborted requests count by
        reason but stay out of the latency histograms: their latency is when they were given up,
        not how long serving took."""
        self.finished.labels(result.finish_reason).inc()
        if result.finish_reason == "abort":
            return
        if result.meta.completion_tokens:
            self._observe("ttft", result.meta.ttft)
        self._observe("latency", result.meta.latency)
        self._observe("queue", result.meta.queue_time)

    def observe_token_gap(self, seconds: float) -> None:
        """The time per token between a request's consecutive outputs."""
        self._observe("itl", seconds)

    def observe_end(self, reason: str) -> None:
        """A request ended without a result: "abort" (its client left) or "error" (refused)."""
        self.finished.labels(reason).inc()

    def render(self, stats: Stats) -> bytes:
        """The Prometheus text exposition, with `stats` as the scheduler's counters and gauges."""
        with self._lock:
            self._stats.stats = stats
            if self.sessions is not None:
                count, tokens = self.sessions()
                self.open_sessions.set(count)
                self.session_tokens.set(tokens)
            return generate_latest(self.registry)
