"""``type: circuit_breaker`` — one breaker per upstream, shared by every route that uses it.

It picks the target of each attempt among those whose breaker lets a call through (the route's,
then its ``fallbacks``', skipping what this request tried already: see ``Router.pick``), so an open
breaker fails over at once, with no backoff; when every breaker is open the answer is 503
``upstream_unavailable`` with ``Retry-After``. Then it records how the call went: connect errors,
resets, timeouts and 5xx (429 with ``count_429``) are failures. A slow call is an SSE stream whose
first body byte (the first token) came more than ``slow_call_s`` after the request was sent — the
rule operators of LLM backends use; a non-streaming answer is slow only past
``slow_call_non_stream_s``, when set, since its first byte is the whole generation. A streamed
body's end decides for it: a stream cut mid-way is a failure. The state machine is
:mod:`middleware.circuit_state`.

Put it after ``retry`` in the chain, so that each retry picks its target here again.

```yaml
middleware:
  - {type: retry}
  - {type: circuit_breaker, consecutive_failures: 5, slow_call_s: 1.5, open_s: 5}
```
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, fields

from middleware.breaker_share import BreakerShare, SharedBreakerConfig
from middleware.circuit_state import CircuitState, TripRules
from proxy.body import is_event_stream, tap_body
from proxy.chain import Handler
from proxy.config import opt
from proxy.errors import NoHealthyTarget, ProxyError, UpstreamUnavailable
from proxy.http import Request, Response
from proxy.metrics import REDIS_FAILURES, REDIS_FAILURES_HELP
from proxy.registry import BuildContext
from proxy.requested_model import requested_model
from proxy.routing import Router

log = logging.getLogger("llm_sidecar.circuit_breaker")


@dataclass(frozen=True)
class CircuitBreakerConfig:
    consecutive_failures: int = opt(5, "failures in a row that open the breaker", min=1)
    failure_ratio: float = opt(
        0.5, "share of failed calls over window_s that opens the breaker", min=0.01, max=1.0
    )
    window_s: int = opt(10, "seconds of calls the failure ratio looks at", min=1, max=3600)
    min_calls: int = opt(20, "calls within window_s before the failure ratio counts", min=1)
    slow_call_s: float = opt(
        1.5,
        "a stream whose first body byte comes later than this after the request is a slow call",
        min=0.001,
    )
    slow_call_non_stream_s: float | None = opt(
        None, "a non-streaming answer later than this is a slow call (unset: never)", min=0.001
    )
    slow_calls: int = opt(5, "slow calls in a row that open the breaker", min=1)
    open_s: float = opt(5.0, "how long an open breaker lets nothing through", min=0.001)
    half_open_probes: int = opt(
        3, "calls let through after open_s; all succeeding closes it, one failing re-opens it", min=1
    )
    count_429: bool = opt(False, "count an upstream's 429 as a failure")
    shared: SharedBreakerConfig | None = opt(
        None, "share opens with the fleet's other sidecars through Redis: {url, key_prefix, poll_s}"
    )


class CircuitBreaker:
    Config = CircuitBreakerConfig

    def __init__(self, config: CircuitBreakerConfig, ctx: BuildContext) -> None:
        if ctx.router is None:
            raise ValueError("circuit_breaker needs the router (BuildContext.router)")
        self.router: Router = ctx.router
        self.rng = ctx.rng
        self.clock = ctx.clock
        self.slow_call_s = config.slow_call_s
        self.slow_non_stream_s = config.slow_call_non_stream_s
        # An answer quicker than this is not slow by either rule (no need to look at its headers).
        self._never_slow_below = min(config.slow_call_s, config.slow_call_non_stream_s or math.inf)
        self.count_429 = config.count_429
        rules = TripRules(**{f.name: getattr(config, f.name) for f in fields(TripRules)})
        prev = ctx.previous if isinstance(ctx.previous, CircuitBreaker) else None
        # After a reload with this config unchanged: the upstreams kept keep their breakers' state.
        kept: dict[str, CircuitState] = prev.breakers if prev is not None else {}
        self.breakers: dict[str, CircuitState] = {
            name: kept.get(name) or CircuitState(rules, ctx.clock) for name in ctx.upstreams
        }
        shared = config.shared
        self.share: BreakerShare | None = None
        if prev is not None and prev.share is not None:
            self.share = prev.share  # its Redis sync goes on, now for this build's breakers
            self.share.track(self.breakers)
        elif shared is not None:
            failures = ctx.metrics.counter(REDIS_FAILURES, REDIS_FAILURES_HELP, ["user"])
            self.share = BreakerShare(shared, self.breakers, ctx.clock, failures)
        self._healthy = self._available  # bound once, not per request

    def _available(self, upstream: str) -> bool:
        return self.breakers[upstream].available()

    async def start(self) -> None:
        """Once the sidecar serves (on its loop): the Redis sync of ``shared``, if set."""
        if self.share is not None:
            self.share.start()

    async def __call__(self, request: Request, next: Handler) -> Response:
        ctx = request.ctx
        target = ctx.target
        if target is None:
            model = requested_model(request)
            if model is None:  # files, batches…: the default upstream, no breaker
                return await next(request)
            target = self.router.pick(model, self.rng, ctx.tried, self._healthy)
            if target is None:
                raise self._none_left(model)
        breaker = self.breakers[target.upstream]
        if not breaker.acquire():
            # a target set earlier in the chain (canary) whose breaker is open: let retry fail over
            raise UpstreamUnavailable(f"the circuit breaker of upstream {target.upstream!r} is open")
        ctx.target = target
        started = self.clock.now()
        try:
            response = await next(request)
        except ProxyError as e:
            if e.upstream_fault:
                self.record_failure(breaker, target.upstream, e)
            else:
                breaker.release()
            raise
        except BaseException:
            breaker.release()
            raise
        status = response.status
        if status >= 500 or (status == 429 and self.count_429):
            self.record_failure(breaker, target.upstream, None)
            return response
        now = self.clock.now()
        elapsed = now - started
        body = response.body
        if isinstance(body, bytes):  # the whole answer came with the head
            slow = elapsed > self._never_slow_below and self._slow_whole(response, elapsed)
            self.record_success(breaker, target.upstream, slow, now)
            return response
        if is_event_stream(response):
            streamed_slow: bool | None = None  # decided by the first body chunk
        else:
            limit = self.slow_non_stream_s
            streamed_slow = limit is not None and elapsed > limit
        response.body = tap_body(body, _StreamOutcome(self, breaker, target.upstream, started, streamed_slow))
        return response

    def _slow_whole(self, response: Response, elapsed: float) -> bool:
        """A whole answer ``elapsed`` after the request: slow by the stream or non-stream rule?"""
        if is_event_stream(response):
            return elapsed > self.slow_call_s
        limit = self.slow_non_stream_s
        return limit is not None and elapsed > limit

    def record_success(self, breaker: CircuitState, upstream: str, slow: bool, now: float) -> None:
        trips = breaker.trips
        breaker.success(slow, now)
        if breaker.trips != trips:
            self._opened(breaker, upstream, "slow calls")

    def record_failure(self, breaker: CircuitState, upstream: str, exc: BaseException | None) -> None:
        trips = breaker.trips
        breaker.failure()
        if breaker.trips != trips:
            self._opened(breaker, upstream, f"failures; the last: {exc or 'an error status'}")

    def readiness(self) -> list[str]:
        """/readyz: the shared state's Redis failing (the breakers themselves App reads)."""
        return self.share.problems() if self.share is not None else []

    async def aclose(self) -> None:
        if self.share is not None:
            await self.share.aclose()

    def _opened(self, breaker: CircuitState, upstream: str, why: str) -> None:
        if self.share is not None:
            self.share.opened(upstream)
        log.warning(
            "circuit breaker of upstream %s opened for %g s (%s)", upstream, breaker.rules.open_s, why
        )

    def _none_left(self, model: str) -> NoHealthyTarget:
        upstreams = self.router.upstreams_of(model)
        down = self.router.unavailable(model)  # failed their health checks (their breakers may be closed)
        wait = min((self.breakers[u].retry_after() for u in upstreams if u not in down), default=1.0)
        seconds = max(1, math.ceil(wait))
        why = "every circuit breaker is open"
        if down:
            checks = "; ".join(f"upstream {u} failed its health check: {r}" for u, r in down.items())
            why = (
                checks if len(down) == len(upstreams) else f"{checks}; the others' circuit breakers are open"
            )
        return NoHealthyTarget(
            f"no upstream can serve model '{model}' now: {why}; retry in {seconds} s",
            headers=[(b"retry-after", b"%d" % seconds), (b"retry-after-ms", b"%d" % int(wait * 1000))],
        )


class _StreamOutcome:
    """Body tap: a streamed response counts when it ends — cut short is a failure. When ``slow`` is
    None (an SSE stream), the first chunk decides it: later than ``slow_call_s`` is slow."""

    __slots__ = ("breaker", "middleware", "slow", "started", "upstream")
    keeps_length = True

    def __init__(
        self,
        middleware: CircuitBreaker,
        breaker: CircuitState,
        upstream: str,
        started: float,
        slow: bool | None,
    ) -> None:
        self.middleware = middleware
        self.breaker = breaker
        self.upstream = upstream
        self.started = started
        self.slow = slow

    def _first_byte(self) -> bool:
        middleware = self.middleware
        self.slow = slow = middleware.clock.now() - self.started > middleware.slow_call_s
        return slow

    def feed(self, chunk: bytes) -> bytes:
        if self.slow is None:
            self._first_byte()
        return chunk

    def end(self, exc: BaseException | None) -> bytes:
        if exc is None:
            slow = self._first_byte() if self.slow is None else self.slow
            self.middleware.record_success(self.breaker, self.upstream, slow, self.middleware.clock.now())
        elif isinstance(exc, asyncio.CancelledError) or not getattr(exc, "upstream_fault", False):
            self.breaker.release()  # the client left: no verdict on the upstream
        else:
            self.middleware.record_failure(self.breaker, self.upstream, exc)
        return b""
