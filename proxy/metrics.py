"""The metrics of one process: plain counters the hot path adds to, rendered at scrape time.

Counting is what the request driver does per request: one dict write when the chain answers
(:meth:`Metrics.answered`), one dict pop and two histogram observations (a dict get, a bisect,
three adds each) when the response is complete (:meth:`Metrics.done`). Nothing takes a lock or
formats a string per request: prometheus_client's own ``Histogram`` takes a lock on each
``observe``. The collector
(proxy/metrics_export.py, imported only with the admin listener on) turns the counters, and what
the process reads from its pools, breakers and front at that moment, into metric families when
``/metrics`` is scraped; it lives in its own ``CollectorRegistry`` (never the library's global
``REGISTRY``: no module-level state).

Labels are bounded by the config: ``route`` is the client's model name when it is a configured
route, else "" (a client cannot mint series by sending made-up models); ``upstream`` is the
upstream of the last attempt's target, "" when none was chosen (a request refused before routing,
one without a model sent to the default upstream). A request whose client left before the chain
answered is counted with status 499 (nginx's "client closed request").

What else is counted, each where it is known:
- the sidecar's own overhead (``llm_sidecar_overhead_seconds``): the request's duration less the
  time it waited on upstreams (``ctx.upstream_s``, summed over attempts by the forwarder: from
  handing the request to a pool to the response head) and, for a streamed answer, less the time
  from the last head to the end (the upstream paces a stream);
- per answer of an upstream: token usage (``gen_ai_client_token_usage`` by ``gen_ai_token_type``,
  from the answer's ``usage``): a whole answer's read in :meth:`Metrics.answered` (the driver
  hands the tokens on to the access log, which does not read them again); a stream's at its end,
  from the driver's body tap (:mod:`proxy.access_log`, whose entry :meth:`Metrics.outcome` reads
  on the loop), with its time to first token (complete request → first body chunk) and time per
  output token (first chunk → end over the output tokens after the first);
- middleware counters (retries, budget refusals, rate-limit refusals, Redis failures): plain
  :class:`Counter` objects a middleware gets from its :class:`MetricsScope`
  (``BuildContext.metrics``), rendered with the rest.

``model`` is the model name the chosen target gives its upstream (the config's, so bounded), ""
when none was chosen.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from proxy.clock import Clock
from proxy.errors import ProxyError
from proxy.http import Request
from proxy.requested_model import read_model
from proxy.usage import MAX_USAGE_BODY, USAGE_KEY, Tokens, Usage, tokens_in

DEFAULT_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The OpenTelemetry GenAI semantic conventions' advised bucket boundaries.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
TOKEN_BUCKETS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, … 67,108,864
# The sidecar's own time: from 50 µs.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
CLIENT_CLOSED = 499
# One counter for every Redis user (rate_limit, circuit_breaker's sharing), labelled by ``user``.
REDIS_FAILURES = "redis_failures"
REDIS_FAILURES_HELP = "Redis round trips that failed (error or no answer in time), by the middleware"

# (route, upstream, model, status)
Key = tuple[str, str, str, int]
# (route, upstream, model)
TargetKey = tuple[str, str, str]

# AccessEntry positions (proxy/access_log.py) that Metrics.outcome reads.
_CTX, _ROUTE, _STATUS, _OUTCOME, _USAGE, _FIRST, _END = 1, 4, 5, 7, 10, 11, 12  # (_USAGE: USAGE_AT)


class Series:
    """The observations of one label set: their count, sum and per-bucket counts."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self, n_bounds: int) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (n_bounds + 1)  # per bucket, not cumulative; the last one is +Inf


class Histogram:
    """One histogram's series by label values; rendered cumulative at scrape time."""

    __slots__ = ("bounds", "series")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.series: dict[tuple[Any, ...], Series] = {}

    def observe(self, key: tuple[Any, ...], value: float) -> None:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series(len(self.bounds))
        series.count += 1
        series.sum += value
        series.buckets[bisect_left(self.bounds, value)] += 1

    def series_for(self, key: tuple[Any, ...]) -> Series:
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = Series(len(self.bounds))
        return series


class TokenPair:
    """The input and output series of ``gen_ai_client_token_usage`` for one target, looked up
    once per target rather than twice per answer."""

    __slots__ = ("bounds", "input", "output")

    def __init__(self, histogram: Histogram, target: tuple[Any, ...]) -> None:
        self.bounds = histogram.bounds
        self.input = histogram.series_for((*target, "input"))
        self.output = histogram.series_for((*target, "output"))

    def add(self, prompt: int | None, completion: int | None) -> None:
        if prompt is not None:
            series = self.input
            series.count += 1
            series.sum += prompt
            series.buckets[bisect_left(self.bounds, prompt)] += 1
        if completion is not None:
            series = self.output
            series.count += 1
            series.sum += completion
            series.buckets[bisect_left(self.bounds, completion)] += 1


class Counter:
    """A counter family of plain numbers by label values: what a middleware adds to per event."""

    __slots__ = ("help", "labels", "name", "values")

    def __init__(self, name: str, help: str, labels: tuple[str, ...]) -> None:
        self.name = name
        self.help = help
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...] = (), n: float = 1) -> None:
        values = self.values
        values[key] = values.get(key, 0) + n


class MetricsScope:
    """Where a middleware gets its counters (``BuildContext.metrics``). A name asked for again,
    by the successor a reload builds, is the same counter: counts never go back. Rendered under
    ``llm_sidecar_<name>_total`` when metrics are on; with them off they count and nobody reads
    them (a middleware never needs to know)."""

    def __init__(self) -> None:
        self.counters: dict[str, Counter] = {}

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Counter:
        labels = tuple(labels)
        counter = self.counters.get(name)
        if counter is None:
            counter = self.counters[name] = Counter(f"llm_sidecar_{name}", help, labels)
        elif counter.labels != labels:
            raise ValueError(f"counter {name!r} exists with labels {counter.labels}, not {labels}")
        return counter


class Metrics:
    """Counters of one process, built by App; the driver and the body tap add to them."""

    def __init__(self, clock: Clock, duration_buckets: Iterable[float] = DEFAULT_DURATION_BUCKETS) -> None:
        self.clock = clock  # the driver's: ctx.started is its time
        self.durations = Histogram(duration_buckets)  # by Key: also the request counts
        self.overhead = Histogram(OVERHEAD_BUCKETS)  # by (route, upstream)
        self.ttft = Histogram(TTFT_BUCKETS)  # by TargetKey
        self.tpot = Histogram(TPOT_BUCKETS)  # by TargetKey
        self.tokens = Histogram(TOKEN_BUCKETS)  # by TargetKey + ("input" | "output",)
        self._token_pairs: dict[tuple[Any, ...], TokenPair] = {}  # by TargetKey: into ``tokens``
        self.scope = MetricsScope()
        self.routes: frozenset[str] = frozenset()  # the configured routes (App sets it per build)
        self._answered: dict[Request, Key] = {}  # answered by the chain, response not complete yet
        self._streamed: set[Request] = set()  # of those, the ones whose body is streamed
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
        if target is None:
            return (route, "", "", status)
        return (route, target.upstream, target.model, status)

    def answered(self, request: Request, status: int, body: Any = b"") -> Tokens | None:
        """The chain answered ``status``; counted when the response is complete (:meth:`done`),
        or now when it already is (the client left before the chain answered). A whole answer
        (``body`` bytes) of an upstream has its tokens counted now, and returned (the access log
        takes them); a streamed one's come at its end, through :meth:`outcome`."""
        ctx = request.ctx
        read = request.model_read
        target = ctx.target
        if read is None or ctx.build is None or target is None:  # the rarer paths
            key = self.key(request, status)
            if ctx.build is None:  # done() came first
                self._observe(key, request, self.clock.now(), False)
                return None
        else:
            model = read[1][0]
            key = (model if model in self.routes else "", target.upstream, target.model, status)
        self._answered[request] = key
        if type(body) is not bytes:
            self._streamed.add(request)
            return None
        if target is None or status != 200 or len(body) > MAX_USAGE_BODY:
            return None
        extra = ctx._extra
        usage = extra.get(USAGE_KEY) if extra else None
        if isinstance(usage, Usage):  # read already (rate_limit)
            self._tokens(key, usage.prompt_tokens, usage.completion_tokens)
            return None
        tokens = tokens_in(body)
        if tokens is not None:
            self._tokens(key, tokens.prompt, tokens.completion)
        return tokens

    def _tokens(self, key: tuple[Any, ...], prompt: int | None, completion: int | None) -> None:
        """Count an answer's tokens under its target (``key``'s route, upstream, model)."""
        target = key[:3]
        pair = self._token_pairs.get(target)
        if pair is None:
            pair = self._token_pairs[target] = TokenPair(self.tokens, target)
        pair.add(prompt, completion)

    def done(self, request: Request) -> None:
        """The response is complete (the driver calls this once per request)."""
        key = self._answered.pop(request, None)
        if key is not None:  # (None: answered by the sidecar itself, /healthz, or not yet by the chain)
            streamed = False
            if self._streamed:
                streamed = request in self._streamed
                self._streamed.discard(request)
            self._observe(key, request, self.clock.now(), streamed)

    def _observe(self, key: Key, request: Request, now: float, streamed: bool) -> None:
        ctx = request.ctx
        duration = now - ctx.started
        self.durations.observe(key, duration)
        outside = duration - ctx.upstream_s
        if streamed and ctx.upstream_at >= 0:
            outside -= now - ctx.upstream_at
        self.overhead.observe(key[:2], outside if outside > 0 else 0.0)

    def refuse(self, status: int) -> None:
        """The front refused a request before it was complete (413, 431, 408, 400): no route yet."""
        self.refused[status] = self.refused.get(status, 0) + 1

    def outcome(self, entry: tuple[Any, ...]) -> Tokens | None:
        """What the body tap saw of an answer (an ``AccessEntry``): its tokens, and for a stream
        that ended well its time to first token and per output token. Returns the tokens it read
        from the answer (the access log takes them rather than reading them again)."""
        ctx = entry[_CTX]
        target = ctx.target
        if target is None:  # no upstream was asked (a refusal, /v1/models, a cache hit)
            return None
        route = entry[_ROUTE]
        key: TargetKey = (route if route in self.routes else "", target.upstream, target.model)
        first = entry[_FIRST]
        ok = entry[_STATUS] == 200 and entry[_OUTCOME] is None
        if first >= 0 and ok:
            self.ttft.observe(key, first - ctx.started)
        extra = ctx._extra
        usage = extra.get(USAGE_KEY) if extra else None
        prompt: int | None
        completion: int | None
        counts = None
        if isinstance(usage, Usage):
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
        else:
            source = entry[_USAGE]
            if source is None:
                return None
            counts = tokens_in(source)
            if counts is None:
                return None
            prompt, completion = counts.prompt, counts.completion
        self._tokens(key, prompt, completion)
        if completion is not None and first >= 0 and ok and completion > 1:
            self.tpot.observe(key, (entry[_END] - first) / (completion - 1))
        return counts


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
