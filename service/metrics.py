"""Prometheus metrics on a PRIVATE registry per app, so several apps in one process never clash.

Counters the code increments (requests, latency, tokens, per-adapter requests, rejections) plus
values read at scrape time from the live objects (composed-adapter cache hits and misses from the
resolver's ``stats``, engine readiness, requests in flight).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from big5personas.resolver import ResolvedPersona

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _LiveCollector(Collector):
    """Reads the resolver's cache counters and the engine/admission state when scraped."""

    def __init__(self, stats: Mapping[str, int], ready: Callable[[], bool], in_flight: Callable[[], int]) -> None:
        self._stats = stats
        self._ready = ready
        self._in_flight = in_flight

    def collect(self) -> Iterable[Metric]:
        hits = CounterMetricFamily("big5_composed_cache_hits", "Composed adapters reused from the disk cache.")
        hits.add_metric([], float(self._stats.get("composed_hits", 0)))
        misses = CounterMetricFamily("big5_composed_cache_misses", "Composed adapters built (cache misses).")
        misses.add_metric([], float(self._stats.get("composed_misses", 0)))
        ready = GaugeMetricFamily("big5_engine_ready", "1 when the generation engine is ready.")
        ready.add_metric([], 1.0 if self._ready() else 0.0)
        in_flight = GaugeMetricFamily("big5_requests_in_flight", "Generation/assessment requests admitted now.")
        in_flight.add_metric([], float(self._in_flight()))
        return [hits, misses, ready, in_flight]


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "big5_http_requests", "HTTP requests by route template and status.",
            ["method", "route", "status"], registry=self.registry,
        )  # fmt: skip
        self.latency = Histogram(
            "big5_http_request_duration_seconds", "HTTP request latency (streams: until the last byte).",
            ["method", "route"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "big5_prompt_tokens", "Prompt tokens sent to the engine.", ["method"], registry=self.registry
        )
        self.generation_tokens = Counter(
            "big5_generation_tokens", "Tokens generated, by persona method.", ["method"], registry=self.registry
        )
        self.adapter_requests = Counter(
            "big5_adapter_requests",
            "Generation requests per registry adapter (kind: single, composed part, or none).",
            ["adapter", "kind"], registry=self.registry,
        )  # fmt: skip
        self.rejected = Counter(
            "big5_requests_rejected", "Requests refused before generation, by reason.", ["reason"],
            registry=self.registry,
        )  # fmt: skip
        self._live: _LiveCollector | None = None

    def bind(self, stats: Mapping[str, int], ready: Callable[[], bool], in_flight: Callable[[], int]) -> None:
        """Attach the live objects of a started service (again on a restart of the lifespan)."""
        if self._live is not None:
            self.registry.unregister(self._live)
        self._live = _LiveCollector(stats, ready, in_flight)
        self.registry.register(self._live)

    # ------------------------------------------------------------ recording

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def observe_persona(self, persona: ResolvedPersona) -> None:
        if persona.adapter_name is None:
            self.adapter_requests.labels("none", "none").inc()
        elif persona.composed:  # label by the registry parts: bounded, unlike composed-<hash> names
            for part in persona.parts:
                self.adapter_requests.labels(str(part.get("adapter")), "composed").inc()
        else:
            self.adapter_requests.labels(persona.adapter_name, "single").inc()

    def observe_tokens(self, method: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.labels(method).inc(prompt_tokens)
        self.generation_tokens.labels(method).inc(completion_tokens)

    def observe_rejection(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    # ------------------------------------------------------------ exposition

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
