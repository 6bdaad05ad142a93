"""Active health checks (proxy/health.py): the state machine, the board routers and /readyz read,
the loops App keeps in step with the config, the HTTP probe against real sockets, and the config."""

from __future__ import annotations

import asyncio
import logging
import random
import textwrap

import pytest

from middleware.circuit_breaker import CircuitBreaker, CircuitBreakerConfig
from proxy.admin import problems
from proxy.clock import FakeClock
from proxy.config import HealthCheckConfig, RouteConfig, TargetConfig, UpstreamConfig
from proxy.config_loader import ConfigError, load_config_text
from proxy.errors import NoHealthyTarget
from proxy.health import HealthBoard, HealthChecker, HealthChecks, HealthState, http_probe
from proxy.http import Response
from proxy.metrics import MetricsScope
from proxy.registry import BuildContext
from proxy.routing import Router, Target
from tests.unit.test_failover import request
from tests.unit.test_metrics import Breaker, Serving, route

CHECK = HealthCheckConfig(path="/health", interval_s=5, timeout_s=0.5, unhealthy_after=2, healthy_after=2)


def upstream(url: str = "http://127.0.0.1:1", health: HealthCheckConfig | None = CHECK) -> UpstreamConfig:
    return UpstreamConfig(url=url, health=health)


# ---- HealthState ----------------------------------------------------------------------------------


def test_state_goes_down_after_unhealthy_after_failures_in_a_row_and_up_after_healthy_after() -> None:
    state = HealthState(CHECK)
    assert not state.record("refused") and state.up  # one failure: not yet
    assert not state.record(None) and state.up  # a pass breaks the streak
    assert not state.record("refused")
    assert state.record("status 503") and not state.up  # second in a row: down, once
    assert state.why == "status 503"
    assert not state.record("timeout") and state.why == "timeout"  # still down, latest reason
    assert not state.record(None)  # one pass of the two needed
    assert not state.record("timeout")  # breaks it
    assert not state.record(None)
    assert state.record(None) and state.up and state.why == ""


# ---- the checker and the board --------------------------------------------------------------------


def scripted(results: list[str | None]) -> tuple[list[int], object]:
    calls: list[int] = []

    async def probe() -> str | None:
        calls.append(1)
        return results.pop(0) if results else None

    return calls, probe


async def test_a_checker_marks_the_board_once_per_change_and_logs_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scope = MetricsScope()
    board = HealthBoard(scope)
    _, probe = scripted(["GET /health answered 503", "GET /health answered 503", "refused", None, None])
    checker = HealthChecker("a", upstream(), board, FakeClock(), probe)  # type: ignore[arg-type]
    with caplog.at_level(logging.WARNING, logger="llm_sidecar.health"):
        await checker.check_once()
        assert board.down == {}
        await checker.check_once()
        assert board.down == {"a": "GET /health answered 503"}
        await checker.check_once()
        assert board.down == {"a": "refused"}  # still down: the latest reason shows
        await checker.check_once()
        assert board.down == {"a": "refused"}  # healthy_after is 2
        await checker.check_once()
        assert board.down == {}
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "upstream a failed its health check: down, no traffic until it passes (GET /health answered 503)",
        "upstream a passed its health check: up again, taking traffic",
    ]
    assert scope.counters["upstream_health_checks"].values == {("a", "fail"): 3, ("a", "pass"): 2}
    assert scope.counters["upstream_health_changes"].values == {("a", "down"): 1, ("a", "up"): 1}


async def test_the_loop_checks_every_interval_on_the_clock() -> None:
    clock = FakeClock()
    calls, probe = scripted([])
    checker = HealthChecker("a", upstream(), HealthBoard(MetricsScope()), clock, probe)  # type: ignore[arg-type]
    task = asyncio.ensure_future(checker.run())
    for _ in range(20):
        await asyncio.sleep(0)
    task.cancel()
    assert len(calls) >= 3
    assert clock.slept[:3] == [5, 5, 5]


async def test_a_probe_that_raises_counts_as_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    board = HealthBoard(MetricsScope())

    async def broken() -> str | None:
        raise KeyError("bug")

    checker = HealthChecker("a", upstream(health=CHECK), board, FakeClock(), broken)
    with caplog.at_level(logging.ERROR):
        await checker.check_once()
        await checker.check_once()
    assert board.down == {"a": "the check raised KeyError: 'bug'"}


# ---- what reads the board: the router, readiness ---------------------------------------------------

ROUTES = (
    RouteConfig("chat", (TargetConfig("a", "m"), TargetConfig("b", "m")), fallbacks=("small",)),
    RouteConfig("small", (TargetConfig("c", "s"),)),
)


def test_the_router_never_picks_an_upstream_marked_down() -> None:
    down: dict[str, str] = {}
    router, rng = Router(ROUTES, down), random.Random(1)
    assert {router.pick("chat", rng).upstream for _ in range(50)} == {"a", "b"}  # type: ignore[union-attr]
    down["a"] = "refused"  # the live board: the router sees it without a rebuild
    assert {router.pick("chat", rng) for _ in range(50)} == {Target("b", "m", 1)}
    assert {router.pick("chat", rng, healthy=lambda u: u != "b") for _ in range(20)} == {Target("c", "s", 1)}
    down["c"] = "timeout"
    assert router.pick("chat", rng, healthy=lambda u: u != "b") is None
    assert router.unavailable("chat") == {"a": "refused", "c": "timeout"}
    down.clear()
    assert {router.pick("chat", rng).upstream for _ in range(50)} == {"a", "b"}  # type: ignore[union-attr]


def test_readiness_names_the_upstream_that_failed_its_health_check() -> None:
    routes = (
        route("one", "a"),
        route("two", "a", "b"),
        route("three", "a", fallbacks=("four",)),
        route("four", "c"),
    )
    serving = Serving(routes, {"c": Breaker("open", 1.0)})
    serving.down = {"a": "GET /health answered 503"}
    assert problems(serving) == [
        "route one: no target available (upstream a failed its health check: GET /health answered 503)",
        "route three: no target available (breaker of upstream c open; "
        "upstream a failed its health check: GET /health answered 503)",
        "route four: no target available (breaker of upstream c open)",
    ]
    serving.down = {}
    assert problems(serving) == ["route four: no target available (breaker of upstream c open)"]


# ---- the checkers App keeps in step with the config --------------------------------------------------


async def test_apply_keeps_replaces_and_stops_checkers_as_the_config_changes() -> None:
    board = HealthBoard(MetricsScope())
    made: list[str] = []

    def probe_for(cfg: UpstreamConfig) -> object:
        made.append(cfg.url)

        async def probe() -> str | None:
            return "refused"

        return probe

    checks = HealthChecks(board, FakeClock(), probe_for)  # type: ignore[arg-type]
    checks.apply({"a": upstream("http://h:1"), "b": upstream("http://h:2", None)})
    assert list(checks.checkers) == ["a"]  # b has no health entry
    checks.start()
    first = checks.checkers["a"]
    for _ in range(10):
        await asyncio.sleep(0)
    assert board.down == {"a": "refused"}
    checks.apply({"a": upstream("http://h:1"), "b": upstream("http://h:2", None)})
    assert checks.checkers["a"] is first  # unchanged: kept, still running
    checks.apply({"a": upstream("http://h:9")})
    replaced = checks.checkers["a"]
    assert replaced is not first and replaced.task is not None
    assert not replaced.state.up  # keeps the mark until its own checks decide
    await asyncio.sleep(0)
    assert first.task is not None and first.task.cancelled()
    checks.apply({"a": upstream("http://h:9", None)})  # health removed: no check, counts as up
    assert checks.checkers == {} and board.down == {}
    await checks.stop()
    await asyncio.sleep(0)  # (cancelled by apply: it ends at its next step)
    assert replaced.task.cancelled()
    assert made == ["http://h:1", "http://h:9"]


# ---- the HTTP probe, against real sockets ---------------------------------------------------------------


async def serve(answer: bytes | None) -> tuple[asyncio.Server, list[bytes]]:
    """A server that reads a request head and answers ``answer`` (None: never answers)."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        if answer is None:
            await asyncio.sleep(10)
        else:
            writer.write(answer)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, seen


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", None),
        (b"HTTP/1.1 204 No Content\r\n\r\n", None),
        (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n", "GET /v1/health answered 503"),
        (b"SSH-2.0-OpenSSH\r\n", "not an HTTP answer: b'SSH-2.0-OpenSSH\\r\\n'"),
        (b"", "connection closed without an answer"),
        (None, "no answer within 0.2 s"),
    ],
)
async def test_the_http_probe_passes_only_a_2xx(answer: bytes | None, verdict: str | None) -> None:
    server, seen = await serve(answer)
    port = server.sockets[0].getsockname()[1]
    cfg = UpstreamConfig(
        url=f"http://127.0.0.1:{port}/base",
        api_key="k-1",
        health=HealthCheckConfig(path="/v1/health", timeout_s=0.2),
    )
    try:
        assert await asyncio.wait_for(http_probe(cfg)(), 2) == verdict
    finally:
        server.close()
    assert seen[0].startswith(b"GET /base/v1/health HTTP/1.1\r\nhost: 127.0.0.1:")
    assert b"authorization: Bearer k-1\r\n" in seen[0] and b"connection: close\r\n" in seen[0]


async def test_the_http_probe_reports_a_refused_connection() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    verdict = await http_probe(upstream(f"http://127.0.0.1:{port}"))()
    assert verdict is not None and verdict.startswith("ConnectionRefusedError")


# ---- config -----------------------------------------------------------------------------------------


def load(health: str) -> UpstreamConfig:
    text = textwrap.dedent(
        f"""\
        upstreams:
          a:
            url: http://127.0.0.1:8001
            health: {health}
        routes:
          - {{model: m, targets: [{{upstream: a, model: m}}]}}
        """
    )
    return load_config_text(text, "c.yaml").upstreams["a"]


def test_health_config_loads_with_defaults_and_reports_bad_values_with_their_line() -> None:
    assert load("{}").health == HealthCheckConfig()
    assert load("{path: /healthz, interval_s: 2}").health == HealthCheckConfig(path="/healthz", interval_s=2)
    with pytest.raises(ConfigError) as e:
        load("{path: health, interval_s: 0, unhealthy_after: 0, timout_s: 1}")
    assert e.value.problems == [
        "c.yaml:4: upstreams.a.health.interval_s: must be a number ≥ 0.05",
        "c.yaml:4: upstreams.a.health.unhealthy_after: must be an integer ≥ 1",
        "c.yaml:4: upstreams.a.health.timout_s: unknown key 'timout_s' (did you mean 'timeout_s'?)",
    ]
    with pytest.raises(ConfigError) as e:
        load("{path: health}")
    assert e.value.problems == [
        "c.yaml:4: upstreams.a.health.path: "
        "must start with '/' and hold no spaces or line breaks, got 'health'"
    ]


# ---- with a circuit_breaker: the same board, and an answer that says why --------------------------------


async def test_the_circuit_breaker_skips_upstreams_down_and_says_so_when_none_is_left() -> None:
    down = {"a": "GET /health answered 503"}
    router = Router(ROUTES, down)
    ctx = BuildContext(FakeClock(), random.Random(3), ("chat", "small"), router, ("a", "b", "c"))
    breaker = CircuitBreaker(CircuitBreakerConfig(), ctx)
    served: list[str] = []

    async def upstream(req: object) -> Response:
        served.append(req.ctx.target.upstream)  # type: ignore[attr-defined]
        return Response.json(200, {})

    for _ in range(20):
        await breaker(request(), upstream)
    assert set(served) == {"b"}
    down.update(b="refused", c="no answer within 1 s")
    with pytest.raises(NoHealthyTarget) as e:
        await breaker(request(), upstream)
    assert str(e.value) == (
        "no upstream can serve model 'chat' now: "
        "upstream a failed its health check: GET /health answered 503; "
        "upstream b failed its health check: refused; "
        "upstream c failed its health check: no answer within 1 s; retry in 1 s"
    )
