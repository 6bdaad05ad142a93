"""``type: retry`` — send a request again when that is safe, within a budget.

What is retried (nothing else is): errors raised before any response byte that mark themselves
``retryable`` — connect failures and connect timeouts, a connection closed or reset before the
response head (HTTP/2 REFUSED_STREAM and GOAWAY too, once the pool's own retry is spent), a
saturated pool — and the upstream statuses in ``on_status`` (502, 503, 504), plus 429 with
``on_429``. A response is only ever replaced before the front sent its first byte, since only the
front writes to the client: a stream that breaks later ends with an SSE error event instead.

Each retry avoids the targets this request already tried (another replica of the route, then the
route's ``fallbacks``: see ``Router.pick``) and waits a full-jitter backoff first — or what the
upstream's ``retry-after-ms`` / ``Retry-After`` asks, when it does; if that wait would end past
``deadline_s``, the answer (429 with its headers) goes back to the client at once. A budget caps
retries at ``budget_ratio`` of the requests over ``budget_window_s`` plus ``budget_floor``, so a dead
fleet is not hit ``attempts`` times harder. Every answer carries ``x-retry-attempts`` (retries made).
The pure parts are in :mod:`middleware.retry_policy`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from middleware.retry_policy import Backoff, RetryBudget, retry_after_s
from proxy.body import discard_body
from proxy.chain import Handler
from proxy.config import opt
from proxy.errors import ProxyError
from proxy.http import Request, Response
from proxy.registry import BuildContext

ATTEMPTS_HEADER = b"x-retry-attempts"


@dataclass(frozen=True)
class RetryConfig:
    attempts: int = opt(3, "attempts per request, the first one included", min=1, max=10)
    base_s: float = opt(0.025, "backoff before the first retry is uniform in [0, base_s]", min=0.001)
    cap_s: float = opt(0.25, "the longest backoff (the ceiling doubles per retry up to this)", min=0.001)
    on_status: tuple[int, ...] = opt((502, 503, 504), "upstream statuses that are retried")
    on_429: bool = opt(True, "retry an upstream's 429, after the wait its Retry-After asks for")
    budget_ratio: float = opt(
        0.2, "retries at most this share of the requests over budget_window_s", min=0.0, max=10.0
    )
    budget_floor: int = opt(10, "retries allowed per budget_window_s whatever the traffic", min=0)
    budget_window_s: int = opt(10, "seconds the retry budget looks back", min=1, max=3600)
    deadline_s: float = opt(
        30.0,
        "no retry whose wait would end later than this after the request came: its answer goes back",
        min=0,
    )

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        if self.cap_s < self.base_s:
            problems.append(("cap_s", f"must be ≥ base_s ({self.base_s:g})"))
        for i, status in enumerate(self.on_status):
            if not 400 <= status <= 599:
                problems.append((f"on_status[{i}]", f"must be an error status 400-599, got {status}"))
        return problems


class Retry:
    Config = RetryConfig

    def __init__(self, config: RetryConfig, ctx: BuildContext) -> None:
        self.cfg = config
        self.clock = ctx.clock
        self.backoff = Backoff(config.base_s, config.cap_s, ctx.rng)
        prev = ctx.previous
        self.budget: RetryBudget = (
            prev.budget  # a reload with this config unchanged: the budget's window goes on
            if isinstance(prev, Retry)
            else RetryBudget(config.budget_ratio, config.budget_floor, config.budget_window_s)
        )
        statuses = set(config.on_status)
        if config.on_429:
            statuses.add(429)
        self.statuses = frozenset(statuses)
        self._counts = tuple(b"%d" % n for n in range(config.attempts))
        self.retries = ctx.metrics.counter(
            "retries",
            "Attempts sent again by retry, by the upstream of the attempt that failed",
            ["upstream"],
        )
        self.refused = ctx.metrics.counter(
            "retry_refusals", "Retries not made: attempts, deadline_s or the budget ran out", ["reason"]
        )

    async def __call__(self, request: Request, next: Handler) -> Response:
        ctx = request.ctx
        clock = self.clock
        started = clock.now()
        self.budget.request(started)
        retries = 0
        while True:
            try:
                response = await next(request)
            except ProxyError as e:
                wait = self.backoff.delay(retries)
                if not (e.retryable and self._may_retry(retries, wait, started)):
                    e.headers.append((ATTEMPTS_HEADER, self._counts[retries]))
                    raise
            else:
                if response.status not in self.statuses:
                    response.headers.append((ATTEMPTS_HEADER, self._counts[retries]))
                    return response
                asked = retry_after_s(response.headers, time.time())
                wait = self.backoff.delay(retries) if asked is None else asked
                if not self._may_retry(retries, wait, started):
                    response.headers.append((ATTEMPTS_HEADER, self._counts[retries]))
                    return response
                discard_body(response)
            target = ctx.target
            if target is not None:
                ctx.tried += (target,)
                ctx.target = None
            self.retries.inc((target.upstream if target is not None else "",))
            retries += 1
            ctx.attempt = retries
            if wait > 0:
                await clock.sleep(wait)

    def _may_retry(self, retries: int, wait: float, started: float) -> bool:
        """Is one more attempt allowed after waiting ``wait``? (Counts it against the budget.)"""
        if retries + 1 >= self.cfg.attempts:
            self.refused.inc(("attempts",))
            return False
        now = self.clock.now()
        if now + wait - started > self.cfg.deadline_s:
            self.refused.inc(("deadline",))
            return False
        if not self.budget.try_retry(now):
            self.refused.inc(("budget",))
            return False
        return True
