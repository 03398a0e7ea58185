"""Prometheus metrics of a server: the engine's state read at each scrape, and request latencies."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class _EngineCollector:
    """Queue lengths, KV cache use and token counters, from engine.stats() when scraped."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats()
        for name, doc, value in (
                ("lmc_requests_running", "requests being computed", s.running),
                ("lmc_requests_waiting", "requests waiting to be admitted", s.waiting),
                ("lmc_kv_cache_usage_ratio", "fraction of KV cache blocks in use", s.kv_cache_usage),
                ("lmc_kv_cache_blocks_used", "KV cache blocks in use", s.kv_blocks_used),
                ("lmc_kv_cache_blocks_total", "KV cache blocks", s.kv_blocks_total),
                ("lmc_prefix_cache_hit_rate", "prompt tokens found in the prefix cache / prompt tokens looked up",
                 s.prefix_cache_hit_rate)):
            yield GaugeMetricFamily(name, doc, value=value)
        for name, doc, value in (
                ("lmc_prompt_tokens", "prompt tokens received", s.prompt_tokens),
                ("lmc_generation_tokens", "tokens generated", s.generation_tokens),
                ("lmc_preemptions", "sequences preempted for lack of KV blocks", s.preemptions)):
            yield CounterMetricFamily(name, doc, value=value)


class Metrics:
    """One registry per app (no global state), so several apps can live in one process."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine))
        self.ttft = Histogram("lmc_time_to_first_token_seconds", "time from request to its first token",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram("lmc_time_per_output_token_seconds", "mean time between a request's tokens after the first",
                              buckets=_TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("lmc_e2e_request_latency_seconds", "time from request to its last token",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.finished = Counter("lmc_request_finished", "finished choices by finish reason", ["finish_reason"],
                                registry=self.registry)
        self.rejected = Counter("lmc_request_rejected", "requests answered with an error, by status", ["status"],
                                registry=self.registry)

    def observe(self, start: float, first: float | None, end: float, generated: int, finish_reason: str) -> None:
        """One finished choice: times from time.perf_counter()."""
        self.finished.labels(finish_reason).inc()
        if first is None:
            return
        self.ttft.observe(first - start)
        self.e2e.observe(end - start)
        if generated > 1:
            self.tpot.observe((end - first) / (generated - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
