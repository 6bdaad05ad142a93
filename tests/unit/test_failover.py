"""Failover in process: Router.pick, routes' fallbacks config, and the retry and circuit_breaker
middleware around a scripted ``next`` (fake clock, seeded randomness; no sockets)."""

from __future__ import annotations

import random
import textwrap
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
import pytest

from middleware.circuit_breaker import CircuitBreaker, CircuitBreakerConfig
from middleware.circuit_state import CLOSED, OPEN
from middleware.retry import Retry, RetryConfig
from proxy.body import TappedBody
from proxy.chain import Handler, compose
from proxy.clock import FakeClock
from proxy.config import RouteConfig, TargetConfig
from proxy.config_loader import ConfigError, load_config_text
from proxy.errors import (
    NoHealthyTarget,
    ProxyError,
    UpstreamClosed,
    UpstreamConnectError,
    UpstreamTimeout,
)
from proxy.http import Headers, Request, RequestContext, Response
from proxy.registry import BuildContext
from proxy.routing import Router, Target

ROUTES = (
    RouteConfig(
        model="chat",
        targets=(TargetConfig("a", "m", 1), TargetConfig("b", "m", 1), TargetConfig("off", "m", 0)),
        fallbacks=("small",),
    ),
    RouteConfig(model="small", targets=(TargetConfig("c", "s", 1),)),
    RouteConfig(model="solo", targets=(TargetConfig("a", "m", 1),)),
)
A, B, OFF, C = Target("a", "m", 1), Target("b", "m", 1), Target("off", "m", 0), Target("c", "s", 1)


# ---- Router.pick ---------------------------------------------------------------------------------


def test_pick_prefers_untried_targets_then_fallbacks_then_tried_ones() -> None:
    router, rng = Router(ROUTES), random.Random(1)
    assert {router.pick("chat", rng, (A,)) for _ in range(20)} == {B}
    assert router.pick("chat", rng, (A, B)) == C
    assert {router.pick("chat", rng, (A, B, C)) for _ in range(40)} == {A, B}  # weight 0 never


def test_pick_skips_unhealthy_upstreams_and_gives_none_when_all_are() -> None:
    router, rng = Router(ROUTES), random.Random(1)
    assert {router.pick("chat", rng, (), lambda u: u != "a") for _ in range(20)} == {B}
    assert router.pick("chat", rng, (), lambda u: u == "c") == C
    assert router.pick("chat", rng, (), lambda u: False) is None


def test_a_target_is_its_upstream_and_model_whatever_its_weight() -> None:
    reweighted = Target("a", "m", 50)  # e.g. the same target from a config with other weights
    assert reweighted == A and hash(reweighted) == hash(A) and reweighted in {A}
    assert Target("a", "other", 1) != A and Target("b", "m", 1) != A
    router, rng = Router(ROUTES), random.Random(1)
    assert {router.pick("chat", rng, (reweighted,)) for _ in range(20)} == {B}


def test_pick_splits_by_weight_without_failover() -> None:
    router, rng = Router(ROUTES), random.Random(5)
    picks = [router.pick("chat", rng) for _ in range(2000)]
    assert OFF not in picks and 900 < picks.count(A) < 1100


MINIMAL = """\
upstreams:
  a: {url: "http://127.0.0.1:8001"}
routes:
  - model: chat
    targets: [{upstream: a, model: m}]
    fallbacks: [%s]
  - model: small
    targets: [{upstream: a, model: s}]
"""


@pytest.mark.parametrize(
    ("fallbacks", "message"),
    [
        ("nope", "config.yaml:6: routes[0].fallbacks[0]: unknown route 'nope'; known: chat, small"),
        ("chat", "config.yaml:6: routes[0].fallbacks[0]: a route cannot fall back to itself"),
    ],
)
def test_fallbacks_must_name_another_route(fallbacks: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(MINIMAL % fallbacks), "config.yaml", {})
    assert info.value.problems == [message]


def test_retry_config_problems_are_reported() -> None:
    text = (
        MINIMAL % "small" + "middleware:\n  - {type: retry, base_s: 1, cap_s: 0.5, on_status: [503, 200]}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "config.yaml", {})
    assert info.value.problems == [
        "config.yaml:10: middleware[0].cap_s: must be ≥ base_s (1)",
        "config.yaml:10: middleware[0].on_status[1]: must be an error status 400-599, got 200",
    ]


# ---- the middleware around a scripted next -------------------------------------------------------


def request(model: str = "chat") -> Request:
    ctx = RequestContext(b"rid", "127.0.0.1:1", 0.0)
    body = orjson.dumps({"model": model, "messages": []})
    return Request(
        "POST", b"/v1/chat/completions", Headers([(b"content-type", b"application/json")]), body, ctx
    )


Outcome = Callable[[Target], Response]


class Upstreams:
    """The end of the chain: answers by the target's upstream, records what was tried."""

    def __init__(self, clock: FakeClock, **outcomes: Outcome) -> None:
        self.clock = clock
        self.outcomes = outcomes
        self.calls: list[str] = []
        self.router = Router(ROUTES)
        self.rng = random.Random(11)

    async def __call__(self, req: Request) -> Response:
        target = req.ctx.target
        if target is None:  # no circuit_breaker in the chain: pick as the forwarder does
            target = self.router.pick(req.json()["model"], self.rng, req.ctx.tried)
            assert target is not None
        self.calls.append(target.upstream)
        return self.outcomes[target.upstream](target)


def ok(target: Target) -> Response:
    return Response.json(200, {"served_by": target.upstream})


def status(code: int, headers: list[tuple[bytes, bytes]] | None = None) -> Outcome:
    return lambda target: Response.json(code, {"error": {}}, Headers(headers or []))


def raises(exc: Callable[[], ProxyError]) -> Outcome:
    def outcome(target: Target) -> Response:
        raise exc()

    return outcome


def context(clock: FakeClock) -> BuildContext:
    return BuildContext(
        clock, random.Random(3), ("chat", "small", "solo"), Router(ROUTES), ("a", "b", "off", "c")
    )


def chain(clock: FakeClock, upstreams: Upstreams, retry: RetryConfig | None, breaker: bool = True) -> Handler:
    ctx = context(clock)
    middleware: list[Any] = []
    if retry is not None:
        middleware.append(Retry(retry, ctx))
    if breaker:
        middleware.append(CircuitBreaker(CircuitBreakerConfig(consecutive_failures=2, open_s=5), ctx))
    return compose(middleware, upstreams)


async def test_a_connect_failure_is_retried_on_another_replica() -> None:
    clock = FakeClock()
    ups = Upstreams(clock, a=raises(lambda: UpstreamConnectError("down")), b=ok, c=ok)
    handler = chain(clock, ups, RetryConfig())
    for _ in range(10):
        ups.calls.clear()
        response = await handler(request())
        assert response.status == 200
        assert ups.calls in (["b"], ["a", "b"])  # never a twice, never the fallback
        assert response.headers.get(b"x-retry-attempts") == (b"1" if ups.calls[0] == "a" else b"0")


async def test_an_open_breaker_fails_over_at_once_without_backoff() -> None:
    clock = FakeClock()
    ups = Upstreams(clock, a=raises(lambda: UpstreamConnectError("down")), b=ok, c=ok)
    handler = chain(clock, ups, RetryConfig())
    for _ in range(30):
        await handler(request())
    a_calls = ups.calls.count("a")
    assert a_calls == 2  # consecutive_failures=2 opened it; after that a is never tried
    assert len(clock.slept) == a_calls  # a backoff only after a real failure


async def test_the_route_falls_back_when_every_replica_is_down() -> None:
    clock = FakeClock()
    down: Outcome = raises(lambda: UpstreamConnectError("down"))
    ups = Upstreams(clock, a=down, b=down, c=ok)
    response = await chain(clock, ups, RetryConfig(attempts=3))(request())
    assert isinstance(response.body, bytes) and orjson.loads(response.body) == {"served_by": "c"}
    assert sorted(ups.calls[:2]) == ["a", "b"] and ups.calls[2] == "c"


async def test_when_every_breaker_is_open_the_answer_is_503_with_retry_after() -> None:
    clock = FakeClock()
    down: Outcome = raises(lambda: UpstreamConnectError("down"))
    ups = Upstreams(clock, a=down, b=down, c=down)
    handler = chain(clock, ups, None)
    for _ in range(6):
        with pytest.raises(UpstreamConnectError):
            await handler(request())
    with pytest.raises(NoHealthyTarget) as info:
        await handler(request())
    assert info.value.status == 503 and info.value.code == "upstream_unavailable"
    headers = dict(info.value.headers)
    assert headers[b"retry-after"] == b"5" and 4000 <= int(headers[b"retry-after-ms"]) <= 5000


async def test_a_first_byte_timeout_is_not_retried() -> None:
    clock = FakeClock()
    ups = Upstreams(
        clock, a=raises(lambda: UpstreamTimeout("slow")), b=raises(lambda: UpstreamTimeout("slow"))
    )
    with pytest.raises(UpstreamTimeout) as info:
        await chain(clock, ups, RetryConfig(), breaker=True)(request())
    assert len(ups.calls) == 1  # the upstream may be working on it: not safe to send again
    assert (b"x-retry-attempts", b"0") in info.value.headers


async def test_retryable_statuses_are_retried_up_to_attempts_then_returned() -> None:
    clock = FakeClock()
    ups = Upstreams(clock, a=status(503), b=status(503), c=status(503))
    handler = chain(clock, ups, RetryConfig(attempts=3), breaker=False)
    response = await handler(request())
    assert response.status == 503 and len(ups.calls) == 3
    assert response.headers.get(b"x-retry-attempts") == b"2"
    assert len(clock.slept) == 2 and all(0 <= s <= 0.25 for s in clock.slept)


async def test_an_upstream_retry_after_is_honoured() -> None:
    clock = FakeClock()
    answers = iter([status(429, [(b"retry-after-ms", b"700")]), ok])
    ups = Upstreams(clock, a=lambda t: next(answers)(t), b=lambda t: next(answers)(t))
    response = await chain(clock, ups, RetryConfig(), breaker=False)(request())
    assert response.status == 200 and clock.slept == [0.7]


async def test_a_retry_after_beyond_the_deadline_goes_back_to_the_client_at_once() -> None:
    clock = FakeClock()
    ups = Upstreams(clock, a=status(429, [(b"retry-after", b"60")]), b=status(429, [(b"retry-after", b"60")]))
    response = await chain(clock, ups, RetryConfig(deadline_s=30), breaker=False)(request())
    assert response.status == 429 and clock.slept == [] and len(ups.calls) == 1
    assert response.headers.get(b"retry-after") == b"60"


async def test_429_is_not_retried_when_on_429_is_off() -> None:
    clock = FakeClock()
    ups = Upstreams(clock, a=status(429), b=status(429))
    response = await chain(clock, ups, RetryConfig(on_429=False), breaker=False)(request())
    assert response.status == 429 and len(ups.calls) == 1


async def test_the_budget_caps_retries_of_a_dead_fleet() -> None:
    clock = FakeClock()
    down: Outcome = raises(lambda: UpstreamClosed("reset"))
    ups = Upstreams(clock, a=down, b=down, c=down)
    handler = chain(clock, ups, RetryConfig(attempts=5, budget_ratio=0.2, budget_floor=3), breaker=False)
    for _ in range(100):
        with pytest.raises(UpstreamClosed):
            await handler(request())
    clock.slept.clear()
    assert len(ups.calls) - 100 <= 3 + 0.2 * 100  # within the 10 s window the fake clock stayed in


class StreamBody:
    """A streamed body (pipeable enough for tap_body): ``chunks`` (each ``delay`` fake seconds after
    the last), then ``fail`` raised or the end."""

    def __init__(
        self,
        fail: BaseException | None = None,
        chunks: int = 0,
        clock: FakeClock | None = None,
        delay: float = 0.0,
    ) -> None:
        self.fail = fail
        self.chunks = chunks
        self.clock = clock
        self.delay = delay
        self.aborted = False

    def pipe(self, sink: object) -> None:
        raise NotImplementedError

    def pause_producing(self) -> None: ...

    def resume_producing(self) -> None: ...

    def abort(self) -> None:
        self.aborted = True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self.chunks:
            self.chunks -= 1
            if self.clock is not None:
                self.clock.advance(self.delay)
            return b"data: {}\n\n"
        if self.fail is not None:
            raise self.fail
        raise StopAsyncIteration


async def test_a_stream_cut_mid_way_counts_as_a_failure_when_it_ends() -> None:
    clock = FakeClock()

    def stream(target: Target) -> Response:
        return Response(
            200, Headers([(b"content-type", b"text/event-stream")]), StreamBody(UpstreamClosed("cut"))
        )

    breaker = CircuitBreaker(CircuitBreakerConfig(consecutive_failures=2, open_s=5), context(clock))
    handler = compose([breaker], Upstreams(clock, a=stream))
    state = breaker.breakers["a"]
    for expected in (1, 2):
        response = await handler(request("solo"))
        assert isinstance(response.body, TappedBody)
        assert state.consecutive == expected - 1  # the head alone is no verdict
        with pytest.raises(UpstreamClosed):
            async for _chunk in response.body:
                pass
    assert state.state == OPEN


async def test_a_client_leaving_a_stream_is_no_verdict_on_the_upstream() -> None:
    clock = FakeClock()

    def stream(target: Target) -> Response:
        return Response(200, Headers([(b"content-type", b"text/event-stream")]), StreamBody(None))

    breaker = CircuitBreaker(CircuitBreakerConfig(consecutive_failures=1, open_s=5), context(clock))
    handler = compose([breaker], Upstreams(clock, a=stream))
    for _ in range(3):
        response = await handler(request("solo"))
        assert isinstance(response.body, TappedBody)
        response.body.abort()  # what the front does when the client disconnects
    assert breaker.breakers["a"].state == CLOSED and breaker.breakers["a"].consecutive == 0


async def test_a_stream_whose_first_byte_is_late_is_a_slow_call() -> None:
    clock = FakeClock()

    def stream(delay: float) -> Outcome:
        def outcome(target: Target) -> Response:
            headers = Headers([(b"content-type", b"text/event-stream")])
            return Response(200, headers, StreamBody(chunks=1, clock=clock, delay=delay))

        return outcome

    breaker = CircuitBreaker(CircuitBreakerConfig(slow_call_s=1.5, slow_calls=2), context(clock))
    handler = compose([breaker], Upstreams(clock, a=stream(2.0), b=stream(0.1)))
    for _ in range(20):
        response = await handler(request())
        assert not isinstance(response.body, bytes)
        async for _chunk in response.body:
            pass
    assert breaker.breakers["a"].state == OPEN and breaker.breakers["b"].state == CLOSED


async def test_a_long_non_streaming_answer_is_slow_only_past_its_own_limit() -> None:
    clock = FakeClock()

    def long_answer(target: Target) -> Response:
        clock.advance(10.0)  # a long generation: the first byte is the whole answer
        return ok(target)

    for limit, expected in ((None, CLOSED), (5.0, OPEN)):
        config = CircuitBreakerConfig(slow_call_s=1.5, slow_calls=2, slow_call_non_stream_s=limit)
        breaker = CircuitBreaker(config, context(clock))
        handler = compose([breaker], Upstreams(clock, a=long_answer))
        for _ in range(2):
            await handler(request("solo"))
        assert breaker.breakers["a"].state == expected


async def test_a_discarded_retryable_answer_has_its_stream_aborted() -> None:
    clock = FakeClock()
    bodies: list[StreamBody] = []
    answers = iter(["stream", "ok"])

    def answer(target: Target) -> Response:
        if next(answers) == "ok":
            return ok(target)
        bodies.append(StreamBody(None))
        return Response(503, Headers(), bodies[-1])

    response = await chain(clock, Upstreams(clock, a=answer), RetryConfig(), breaker=False)(request("solo"))
    assert response.status == 200 and bodies[0].aborted  # the upstream stops its 503 stream
