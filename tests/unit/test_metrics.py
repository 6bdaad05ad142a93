"""proxy.metrics: the driver counts each request once, with the duration on the injected clock, and
the collector renders the counts and what it reads from the process at scrape time."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin import problems
from proxy.clock import FakeClock
from proxy.config import LimitsConfig, RouteConfig, TargetConfig
from proxy.errors import ModelNotFound
from proxy.http import Headers, Request, Response
from proxy.metrics import BreakerView, Metrics, PoolView
from proxy.metrics_export import registry_for
from proxy.requested_model import read_model
from proxy.routing import Target
from proxy.server.driver import RequestDriver

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@dataclass
class Breaker:
    state: str = "closed"
    left_s: float = 0.0

    def retry_after(self) -> float:
        return self.left_s


class Pool:
    def __init__(self, stats: dict[str, int]) -> None:
        self._stats = stats

    def stats(self) -> dict[str, int]:
        return self._stats


class Observed:
    def __init__(self, driver: RequestDriver) -> None:
        self.driver = driver
        self.reloads = {"ok": 2, "failed": 1}
        self.pool_map: dict[str, PoolView] = {
            "a": Pool({"open": 3, "idle": 1, "pending": 4}),
            "b": Pool({"open": 1, "streams": 5, "pending": 0}),
        }
        self.breaker_map: dict[str, BreakerView] = {}

    def in_flight(self) -> int:
        return self.driver.in_flight()

    def client_connections(self) -> int:
        return 7

    def pools(self) -> Mapping[str, PoolView]:
        return self.pool_map

    def breakers(self) -> Mapping[str, BreakerView]:
        return self.breaker_map


async def handler(request: Request) -> Response:
    model = read_model(request)[0]
    if model != "chat":
        raise ModelNotFound(f"no {model}")
    request.ctx.target = Target("a", "chat-v1", 1.0)
    return Response(200, Headers(), b"{}")


def make(clock: FakeClock) -> tuple[RequestDriver, Metrics, Observed]:
    driver = RequestDriver(handler, LimitsConfig(), clock)
    metrics = Metrics(clock, (0.5, 1.0))
    metrics.routes = frozenset({"chat"})
    driver.metrics = metrics
    return driver, metrics, Observed(driver)


def request(driver: RequestDriver, model: str, path: bytes = b"/v1/chat/completions") -> Request:
    body = b'{"model": "%b"}' % model.encode()
    headers = Headers([(b"content-type", b"application/json")])
    return driver.request("POST", path, headers, body, "127.0.0.1:1", None)


def scrape(metrics: Metrics, observed: Observed) -> Samples:
    text = generate_latest(registry_for(metrics, observed)).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


async def test_each_request_is_counted_once_with_its_duration_when_complete() -> None:
    clock = FakeClock()
    driver, metrics, observed = make(clock)
    durations = [0.2, 0.7, 3.0]
    for d in durations:
        r = request(driver, "chat")
        response = await driver.respond(r)
        assert response.status == 200
        clock.advance(d)
        assert scrape(metrics, observed)[("llm_sidecar_requests_in_flight", ())] == 1
        driver.done(r)
        driver.done(r)  # a second call does not count again
    lost = request(driver, "made-up")
    assert (await driver.respond(lost)).status == 404
    driver.done(lost)
    health = driver.request("GET", b"/healthz", Headers(), b"", "127.0.0.1:1", None)
    driver.done(health)  # answered by the sidecar, never by the chain: not counted

    m = scrape(metrics, observed)
    ok = {"route": "chat", "upstream": "a", "model": "chat-v1", "status": "200"}
    assert m[("llm_sidecar_requests_total", labels(**ok))] == 3
    assert m[("llm_sidecar_requests_total", labels(route="", upstream="", model="", status="404"))] == 1
    assert m[("gen_ai_client_operation_duration_seconds_count", labels(**ok))] == 3
    assert m[("gen_ai_client_operation_duration_seconds_sum", labels(**ok))] == pytest.approx(3.9)
    cumulative = {
        le: m[("gen_ai_client_operation_duration_seconds_bucket", labels(**ok, le=le))]
        for le in ("0.5", "1.0", "+Inf")
    }
    assert cumulative == {"0.5": 1, "1.0": 2, "+Inf": 3}
    assert m[("llm_sidecar_requests_in_flight", ())] == 0
    assert len(metrics._answered) == 0  # nothing left behind


async def test_a_client_gone_before_the_chain_answers_counts_as_499() -> None:
    clock = FakeClock()
    started = asyncio.Event()

    async def slow(request: Request) -> Response:
        request.ctx.target = Target("a", "chat-v1", 1.0)
        started.set()
        await asyncio.sleep(10)
        raise AssertionError("cancelled before")

    driver, metrics, observed = make(clock)
    driver.current.handler = slow
    r = request(driver, "chat")
    task = asyncio.ensure_future(driver.respond(r))
    await started.wait()
    clock.advance(1.5)
    r.ctx.disconnected = True
    driver.done(r)  # the front: the connection is gone, then it cancels the task
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    m = scrape(metrics, observed)
    gone = labels(route="chat", upstream="a", model="chat-v1", status="499")
    assert m[("llm_sidecar_requests_total", gone)] == 1
    assert m[("gen_ai_client_operation_duration_seconds_sum", gone)] == 1.5
    assert len(metrics._answered) == 0


async def test_in_flight_counts_the_generation_a_reload_replaced() -> None:
    driver, metrics, observed = make(FakeClock())
    r = request(driver, "chat")
    driver.swap(handler)
    r2 = request(driver, "chat")
    assert scrape(metrics, observed)[("llm_sidecar_requests_in_flight", ())] == 2
    driver.done(r)
    driver.done(r2)
    assert scrape(metrics, observed)[("llm_sidecar_requests_in_flight", ())] == 0
    assert driver.retiring == []


def test_the_collector_renders_pools_breakers_reloads_and_connections() -> None:
    _, metrics, observed = make(FakeClock())
    m = scrape(metrics, observed)
    assert m[("llm_sidecar_config_reloads_total", labels(result="ok"))] == 2
    assert m[("llm_sidecar_config_reloads_total", labels(result="failed"))] == 1
    assert m[("llm_sidecar_client_connections", ())] == 7
    assert m[("llm_sidecar_upstream_connections", labels(upstream="a", state="busy"))] == 2
    assert m[("llm_sidecar_upstream_connections", labels(upstream="a", state="idle"))] == 1
    assert m[("llm_sidecar_upstream_waiting_requests", labels(upstream="a"))] == 4
    assert m[("llm_sidecar_upstream_connections", labels(upstream="b", state="busy"))] == 1
    assert m[("llm_sidecar_upstream_h2_streams", labels(upstream="b"))] == 5
    assert not any(name == "llm_sidecar_breaker_state" for name, _ in m)

    observed.breaker_map = {"a": Breaker(), "b": Breaker("open", 2.0), "c": Breaker("open", 0.0)}
    m = scrape(metrics, observed)
    states = {dict(ls)["upstream"]: v for (name, ls), v in m.items() if name == "llm_sidecar_breaker_state"}
    assert states == {"a": 0, "b": 2, "c": 1}  # open with its open_s over: the next call is a probe
    observed.breaker_map["a"] = Breaker("half_open")
    assert scrape(metrics, observed)[("llm_sidecar_breaker_state", labels(upstream="a"))] == 1


class Serving:
    def __init__(self, routes: tuple[RouteConfig, ...], breakers: Mapping[str, BreakerView]) -> None:
        self._routes = routes
        self._breakers = breakers
        self.draining = False
        self.reported: list[str] = []
        self.down: dict[str, str] = {}  # upstream → why its health check failed

    def routes(self) -> tuple[RouteConfig, ...]:
        return self._routes

    def breakers(self) -> Mapping[str, BreakerView]:
        return self._breakers

    def stopping(self) -> bool:
        return self.draining

    def middleware_problems(self) -> list[str]:
        return self.reported

    def upstreams_down(self) -> Mapping[str, str]:
        return self.down


def route(model: str, *upstreams: str, fallbacks: tuple[str, ...] = ()) -> RouteConfig:
    targets = tuple(TargetConfig(u, f"{model}-{u}") for u in upstreams)
    return RouteConfig(model, targets, fallbacks)


def test_readiness_names_each_route_left_without_a_target() -> None:
    routes = (
        route("one", "a"),
        route("two", "a", "b"),
        route("three", "a", fallbacks=("four",)),
        route("four", "c"),
    )
    assert problems(Serving(routes, {})) == []  # no breaker configured
    assert problems(Serving(routes, {"a": Breaker(), "b": Breaker("half_open")})) == []
    opened = {"a": Breaker("open", 1.0), "b": Breaker(), "c": Breaker()}
    assert problems(Serving(routes, opened)) == [
        "route one: no target available (breaker of upstream a open)"
    ]
    opened["c"] = Breaker("open", 3.0)
    assert problems(Serving(routes, opened)) == [
        "route one: no target available (breaker of upstream a open)",
        "route three: no target available (breaker of upstream a, c open)",
        "route four: no target available (breaker of upstream c open)",
    ]
    opened["a"] = Breaker("open", 0.0)  # open_s over: a probe may go
    assert problems(Serving(routes, opened)) == [
        "route four: no target available (breaker of upstream c open)"
    ]


def test_a_stopping_sidecar_is_not_ready() -> None:
    serving = Serving((route("one", "a"),), {})
    serving.draining = True
    assert problems(serving) == ["stopping: finishing the requests in flight, taking no new connections"]


def test_requests_the_front_refused_are_counted_by_status() -> None:
    driver, metrics, observed = make(FakeClock())
    driver.early_error(driver.too_large(), None)
    driver.early_error(driver.too_large(), b"rid")
    driver.early_error(driver.headers_too_large(), None)
    m = scrape(metrics, observed)
    assert m[("llm_sidecar_requests_refused_total", labels(status="413"))] == 2
    assert m[("llm_sidecar_requests_refused_total", labels(status="431"))] == 1
    assert not any(name == "llm_sidecar_requests_total" for name, _ in m)  # no route, no duration


def test_readiness_adds_what_middleware_report() -> None:
    serving = Serving((route("one", "a"),), {"a": Breaker("open", 1.0)})
    serving.reported = ["middleware rate_limit: Redis at 127.0.0.1:6379 has not answered for 12 s"]
    assert problems(serving) == [
        "route one: no target available (breaker of upstream a open)",
        "middleware rate_limit: Redis at 127.0.0.1:6379 has not answered for 12 s",
    ]


def test_a_scope_gives_the_same_counter_to_a_name_asked_again() -> None:
    _, metrics, observed = make(FakeClock())
    retries = metrics.scope.counter("retries", "help", ["upstream"])
    retries.inc(("a",))
    assert metrics.scope.counter("retries", "help", ["upstream"]) is retries  # a reload's successor
    retries.inc(("a",), 2)
    with pytest.raises(ValueError, match="labels"):
        metrics.scope.counter("retries", "help", ["route"])
    assert scrape(metrics, observed)[("llm_sidecar_retries_total", labels(upstream="a"))] == 3


def _entry(
    ctx: object, status: int, usage: object, first: float, end: float, outcome: str | None = None
) -> tuple[object, ...]:
    # the AccessEntry positions Metrics.outcome reads (proxy/access_log.py)
    return (
        0.0,
        ctx,
        "POST",
        "/v1/chat/completions",
        "chat",
        status,
        None,
        outcome,
        0,
        0,
        usage,
        first,
        end,
        None,
        None,
    )


async def test_outcomes_give_tokens_and_stream_timings() -> None:
    clock = FakeClock()
    driver, metrics, observed = make(clock)
    r = request(driver, "chat")
    r.ctx.target = Target("a", "chat-v1", 1.0)
    start = r.ctx.started
    whole = b'{"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}}'
    metrics.outcome(_entry(r.ctx, 200, whole, -1.0, start + 1))
    events = (
        b'data: {"choices": [{"delta": {}}]}\n\n',
        b'data: {"usage": {"prompt_tokens": 5, "completion_tokens": 11}}\n\n',
    )
    metrics.outcome(_entry(r.ctx, 200, events, start + 0.25, start + 1.25))
    metrics.outcome(_entry(r.ctx, 200, None, start + 0.5, start + 2, outcome="client_closed"))
    m = scrape(metrics, observed)
    target = {"route": "chat", "upstream": "a", "model": "chat-v1"}
    assert m[("gen_ai_client_token_usage_sum", labels(**target, gen_ai_token_type="input"))] == 12
    assert m[("gen_ai_client_token_usage_sum", labels(**target, gen_ai_token_type="output"))] == 14
    # one TTFT: the stream that ended well (the whole answer has none, the cut one is not counted)
    assert m[("gen_ai_server_time_to_first_token_seconds_count", labels(**target))] == 1
    assert m[("gen_ai_server_time_to_first_token_seconds_sum", labels(**target))] == pytest.approx(0.25)
    # 1 s from the first chunk over the 10 tokens after the first
    assert m[("gen_ai_server_time_per_output_token_seconds_sum", labels(**target))] == pytest.approx(0.1)


async def test_overhead_is_the_duration_less_the_upstream_time() -> None:
    clock = FakeClock()
    driver, metrics, observed = make(clock)
    r = request(driver, "chat")
    await driver.respond(r)
    r.ctx.upstream_s = 0.75  # what the forwarder counted
    r.ctx.upstream_at = clock.now()
    clock.advance(1.0)
    driver.done(r)
    m = scrape(metrics, observed)
    assert m[("llm_sidecar_overhead_seconds_sum", labels(route="chat", upstream="a"))] == pytest.approx(0.25)
