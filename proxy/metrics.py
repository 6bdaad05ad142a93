"""The metrics of one process: plain counters the hot path adds to, rendered at scrape time.

Counting is what the request driver does per request: one dict write when the chain answers
(:meth:`Metrics.answered`), one dict pop, one dict get, a bisect and three adds when the response
is complete (:meth:`Metrics.done`). Nothing takes a lock or formats a string per request:
prometheus_client's own ``Histogram`` takes a lock on each ``observe``. The collector
(proxy/metrics_export.py, imported only with the admin listener on) turns the counters, and what
the process reads from its pools, breakers and front at that moment, into metric families when
``/metrics`` is scraped; it lives in its own ``CollectorRegistry`` (never the library's global
``REGISTRY``: no module-level state).

Labels are bounded by the config: ``route`` is the client's model name when it is a configured
route, else "" (a client cannot mint series by sending made-up models); ``upstream`` is the
upstream of the last attempt's target, "" when none was chosen (a request refused before routing,
one without a model sent to the default upstream). A request whose client left before the chain
answered is counted with status 499 (nginx's "client closed request").

Where the series still to come go (issue 13, section 2):
- token usage (``gen_ai_client_token_usage`` by ``gen_ai_token_type``), time to first token
  (``gen_ai_server_time_to_first_token_seconds``) and time per output token: observed once per
  attempt by the one body tap at the forwarder (proxy/usage.py sees the stream's ``usage``), as
  counts added to a :class:`Series`-like object of their own here, keyed like ``series``;
- the response model and ``error_type`` labels: part of the key once the tap reports them;
- the sidecar's own overhead (time outside the upstream, buckets from 50 µs): the forwarder's
  send/first-byte timestamps on ``ctx``, subtracted in :meth:`Metrics.done`;
- retries, retry-budget refusals, rate-limit refusals by reason, Redis failures: each middleware
  counts in plain ints of its own and registers a collector through its ``BuildContext`` scope.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Protocol

from proxy.clock import Clock
from proxy.errors import ProxyError
from proxy.http import Request
from proxy.requested_model import read_model

DEFAULT_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CLIENT_CLOSED = 499

# (route, upstream, status)
Key = tuple[str, str, int]


class Series:
    """The requests of one (route, upstream, status): their count and durations, as bucket counts."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self, n_bounds: int) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (n_bounds + 1)  # per bucket, not cumulative; the last one is +Inf


class Metrics:
    """Counters of one process, built by App; the driver adds to them."""

    def __init__(self, clock: Clock, duration_buckets: Iterable[float] = DEFAULT_DURATION_BUCKETS) -> None:
        self.clock = clock  # the driver's: ctx.started is its time
        self.bounds = tuple(float(b) for b in duration_buckets)
        self.series: dict[Key, Series] = {}
        self.routes: frozenset[str] = frozenset()  # the configured routes (App sets it per build)
        self._answered: dict[Request, Key] = {}  # answered by the chain, response not complete yet
        self.refused: dict[int, int] = {}  # status → requests the front refused before they were complete

    # -- the hot path ----------------------------------------------------------------------------
    def key(self, request: Request, status: int) -> Key:
        read = request.model_read
        if read is not None:
            model = read[1][0]
        else:  # answered before anything read the model (a refusal, a client gone): read it now
            try:
                model = read_model(request)[0]
            except ProxyError:
                model = None
        route = model if model is not None and model in self.routes else ""
        target = request.ctx.target
        upstream = target.upstream if target is not None else ""
        return (route, upstream, status)

    def answered(self, request: Request, status: int) -> None:
        """The chain answered ``status``; counted when the response is complete (:meth:`done`),
        or now when it already is (the client left before the chain answered)."""
        ctx = request.ctx
        read = request.model_read
        target = ctx.target
        if read is None or ctx.build is None or target is None:  # the rarer paths
            key = self.key(request, status)
            if ctx.build is None:  # done() came first
                self.observe(key, self.clock.now() - ctx.started)
                return
        else:
            model = read[1][0]
            key = (model if model in self.routes else "", target.upstream, status)
        self._answered[request] = key

    def done(self, request: Request) -> None:
        """The response is complete (the driver calls this once per request)."""
        key = self._answered.pop(request, None)
        if key is not None:  # (None: answered by the sidecar itself, /healthz, or not yet by the chain)
            self.observe(key, self.clock.now() - request.ctx.started)

    def refuse(self, status: int) -> None:
        """The front refused a request before it was complete (413, 431, 408, 400): no route yet."""
        self.refused[status] = self.refused.get(status, 0) + 1

    def observe(self, key: Key, duration: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series(len(self.bounds))
        series.count += 1
        series.sum += duration
        series.buckets[bisect_left(self.bounds, duration)] += 1


# -- what the collector reads at scrape time --------------------------------------------------------
class PoolView(Protocol):
    def stats(self) -> dict[str, int]: ...


class BreakerView(Protocol):
    state: str

    def retry_after(self) -> float: ...


class Observed(Protocol):
    """What the process shows the collector (App)."""

    reloads: dict[str, int]

    def in_flight(self) -> int: ...

    def client_connections(self) -> int: ...

    def pools(self) -> Mapping[str, PoolView]: ...

    def breakers(self) -> Mapping[str, BreakerView]: ...


def breaker_level(breaker: BreakerView) -> int:
    """0 closed, 1 half-open (or open with its open_s over: the next call is a probe), 2 open."""
    if breaker.state == "closed":
        return 0
    if breaker.state == "open" and breaker.retry_after() > 0:
        return 2
    return 1
