"""The metrics rendered for Prometheus: a collector over :class:`proxy.metrics.Metrics` and what
the process shows it (pools, breakers, front), in a ``CollectorRegistry`` of its own.

Apart from proxy/metrics.py so that prometheus_client is imported only when the admin listener is
on (``admin.enabled``): the counting itself needs nothing of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from proxy.metrics import Histogram, Metrics, Observed, PoolView, breaker_level


class SidecarCollector(Collector):
    def __init__(self, metrics: Metrics, observed: Observed) -> None:
        self.metrics = metrics
        self.observed = observed

    def collect(self) -> Iterator[Metric]:
        metrics, observed = self.metrics, self.observed
        labels = ["route", "upstream", "model", "status"]
        requests = CounterMetricFamily(
            "llm_sidecar_requests", "Requests answered, by route, upstream, model and status", labels=labels
        )
        for key, series in list(metrics.durations.series.items()):
            requests.add_metric(_values(key), series.count)
        yield requests
        yield _histogram(
            "gen_ai_client_operation_duration_seconds",
            "Request complete → response complete, in seconds",
            labels,
            metrics.durations,
        )
        target = ["route", "upstream", "model"]
        yield _histogram(
            "gen_ai_server_time_to_first_token_seconds",
            "Streams: request complete → first body chunk, in seconds",
            target,
            metrics.ttft,
        )
        yield _histogram(
            "gen_ai_server_time_per_output_token_seconds",
            "Streams: first body chunk → end, per output token after the first, in seconds",
            target,
            metrics.tpot,
        )
        yield _histogram(
            "gen_ai_client_token_usage",
            "Tokens of each answer, by gen_ai_token_type (input, output), from its usage",
            [*target, "gen_ai_token_type"],
            metrics.tokens,
            unit="",
        )
        yield _histogram(
            "llm_sidecar_overhead_seconds",
            "The sidecar's own time per request: its duration less the time it waited on upstreams",
            ["route", "upstream"],
            metrics.overhead,
        )
        for counter in list(metrics.scope.counters.values()):
            family = CounterMetricFamily(counter.name, counter.help, labels=list(counter.labels))
            for key, n in list(counter.values.items()):
                family.add_metric(list(key), n)
            yield family
        refused = CounterMetricFamily(
            "llm_sidecar_requests_refused",
            "Requests the front refused before they were complete (malformed, too large, slow), by status",
            labels=["status"],
        )
        for status, n in list(metrics.refused.items()):
            refused.add_metric([str(status)], n)
        yield refused
        yield GaugeMetricFamily(
            "llm_sidecar_requests_in_flight",
            "Requests received whose response is not complete",
            value=observed.in_flight(),
        )
        yield GaugeMetricFamily(
            "llm_sidecar_client_connections", "Client connections open", value=observed.client_connections()
        )
        reloads = CounterMetricFamily(
            "llm_sidecar_config_reloads", "Config reloads (SIGHUP), by result", labels=["result"]
        )
        for result, n in observed.reloads.items():
            reloads.add_metric([result], n)
        yield reloads
        yield from _pool_families(observed.pools())
        breakers = observed.breakers()
        if breakers:
            state = GaugeMetricFamily(
                "llm_sidecar_breaker_state",
                "Circuit breaker of each upstream: 0 closed, 1 half-open, 2 open",
                labels=["upstream"],
            )
            for name, breaker in breakers.items():
                state.add_metric([name], breaker_level(breaker))
            yield state


def _pool_families(pools: Mapping[str, PoolView]) -> Iterator[Metric]:
    conns = GaugeMetricFamily(
        "llm_sidecar_upstream_connections",
        "Upstream pool connections, busy or idle (HTTP/2: a connection carrying streams is busy)",
        labels=["upstream", "state"],
    )
    waiting = GaugeMetricFamily(
        "llm_sidecar_upstream_waiting_requests",
        "Requests waiting for an upstream connection",
        labels=["upstream"],
    )
    streams = GaugeMetricFamily(
        "llm_sidecar_upstream_h2_streams", "HTTP/2 streams open to the upstream", labels=["upstream"]
    )
    has_streams = False
    for name, pool in pools.items():
        stats = pool.stats()
        open_ = stats.get("open", 0)
        if "idle" in stats:  # HTTP/1.1: a connection is idle in the pool or busy with one exchange
            idle = stats["idle"]
        else:
            # HTTP/2: stats() has the streams of all connections, not which ones carry them: exact
            # for the usual one connection per upstream (idle when no stream is open).
            n_streams = stats.get("streams", 0)
            idle = 0 if n_streams else open_
            streams.add_metric([name], n_streams)
            has_streams = True
        conns.add_metric([name, "busy"], open_ - idle)
        conns.add_metric([name, "idle"], idle)
        waiting.add_metric([name], stats.get("pending", 0))
    yield conns
    yield waiting
    if has_streams:
        yield streams


def _histogram(
    name: str, help: str, labels: list[str], histogram: Histogram, unit: str = "seconds"
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help, labels=labels, unit=unit)
    bounds = [repr(b) for b in histogram.bounds] + ["+Inf"]
    for key, series in list(histogram.series.items()):
        cumulative, total = [], 0
        for bound, n in zip(bounds, series.buckets, strict=True):
            total += n
            cumulative.append((bound, float(total)))
        family.add_metric(_values(key), cumulative, series.sum)
    return family


def _values(key: tuple[object, ...]) -> list[str]:
    return [str(v) for v in key]


def registry_for(metrics: Metrics, observed: Observed) -> CollectorRegistry:
    """A registry of its own (not prometheus_client's global one) holding the sidecar's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SidecarCollector(metrics, observed))
    return registry
