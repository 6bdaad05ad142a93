"""Active health checks of upstreams (``upstreams.<name>.health``), off the request path.

Each upstream with a ``health`` entry gets a loop (:class:`HealthChecker`) that GETs its path over a
connection of its own (not the pool's: a full pool or a stuck stream must not fail the check, and a
check must not take a slot from requests), every ``interval_s``, each bounded by ``timeout_s``. A 2xx
status line passes; anything else (another status, refused, reset, no answer in time) fails.
``unhealthy_after`` failures in a row mark the upstream down, ``healthy_after`` passes in a row mark
it up again (:class:`HealthState`, pure, no I/O). Each change is logged once and counted.

The verdicts go on one board (:class:`HealthBoard`): a dict of the upstreams that are down and why,
which every build's router reads when it picks a target (proxy/routing.py: a lookup in a dict that is
empty while all pass; no await per request) and /readyz reads when it is asked. So a down upstream
gets no traffic whether or not a ``circuit_breaker`` is configured, and readiness names it.

App owns the board and the checkers: they start once the sidecar listens, a reload that changes an
upstream's ``health`` or ``url`` (or removes it) replaces or stops its checker, and App.stop() stops
them after the front's drain. An upstream starts up (traffic flows before the first verdict); a
replaced checker keeps the upstream's mark until its own checks decide.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping

from proxy.clock import Clock
from proxy.config import HealthCheckConfig, UpstreamConfig, parse_upstream_url
from proxy.metrics import MetricsScope

log = logging.getLogger("llm_sidecar.health")

# A check's answer: None when it passed, else why it failed (for the log and /readyz).
Probe = Callable[[], Awaitable[str | None]]


class HealthState:
    """Up or down from the checks' results: ``unhealthy_after`` failures in a row → down,
    ``healthy_after`` passes in a row → up."""

    __slots__ = ("cfg", "streak", "up", "why")

    def __init__(self, cfg: HealthCheckConfig, up: bool = True, why: str = "") -> None:
        self.cfg = cfg
        self.up = up
        self.why = why  # the last failure's reason while down
        self.streak = 0  # results in a row that go against the current state

    def record(self, failure: str | None) -> bool:
        """One check's result (None: passed, else why it failed). True when the state changed."""
        if self.up:
            if failure is None:
                self.streak = 0
                return False
            self.streak += 1
            self.why = failure
            if self.streak < self.cfg.unhealthy_after:
                return False
            self.up = False
        else:
            if failure is not None:
                self.streak = 0
                self.why = failure  # still down: /readyz shows the latest reason
                return False
            self.streak += 1
            if self.streak < self.cfg.healthy_after:
                return False
            self.up = True
            self.why = ""
        self.streak = 0
        return True


class HealthBoard:
    """The upstreams down by their health checks: ``down`` (name → why) is what routers read."""

    def __init__(self, scope: MetricsScope) -> None:
        self.down: dict[str, str] = {}
        self._checks = scope.counter(
            "upstream_health_checks",
            "Active health checks by upstream and result (pass, fail)",
            ["upstream", "result"],
        )
        self._changes = scope.counter(
            "upstream_health_changes",
            "Upstreams marked down or up by their health checks",
            ["upstream", "to"],
        )

    def checked(self, upstream: str, failure: str | None) -> None:
        self._checks.inc((upstream, "pass" if failure is None else "fail"))

    def mark(self, upstream: str, state: HealthState) -> None:
        """``state`` changed: publish it, log it once."""
        if state.up:
            self.down.pop(upstream, None)
            self._changes.inc((upstream, "up"))
            log.warning("upstream %s passed its health check: up again, taking traffic", upstream)
        else:
            self.down[upstream] = state.why
            self._changes.inc((upstream, "down"))
            log.warning(
                "upstream %s failed its health check: down, no traffic until it passes (%s)",
                upstream,
                state.why,
            )

    def refresh(self, upstream: str, state: HealthState) -> None:
        """Still down, maybe for another reason: /readyz shows the latest."""
        if not state.up:
            self.down[upstream] = state.why

    def forget(self, upstream: str) -> None:
        """No check any more (removed, or its health entry gone): the upstream counts as up."""
        if self.down.pop(upstream, None) is not None:
            log.warning("upstream %s: no health check any more; taking traffic", upstream)


class HealthChecker:
    """One upstream's check loop: :meth:`check_once` (tested with a fake probe and clock), then
    ``interval_s`` of sleep, until cancelled."""

    def __init__(
        self, upstream: str, cfg: UpstreamConfig, board: HealthBoard, clock: Clock, probe: Probe
    ) -> None:
        assert cfg.health is not None
        self.upstream = upstream
        self.cfg = cfg  # the config it checks for: a reload compares it
        self.health = cfg.health
        self.board = board
        self.clock = clock
        self.probe = probe
        down = board.down.get(upstream)
        self.state = HealthState(cfg.health, up=down is None, why=down or "")
        self.task: asyncio.Task[None] | None = None

    async def check_once(self) -> None:
        try:
            failure = await self.probe()
        except Exception as e:  # a bug in a probe must not end the loop: it counts as a failure
            log.exception("health check of upstream %s raised", self.upstream)
            failure = f"the check raised {type(e).__name__}: {e}"
        self.board.checked(self.upstream, failure)
        if self.state.record(failure):
            self.board.mark(self.upstream, self.state)
        else:
            self.board.refresh(self.upstream, self.state)

    async def run(self) -> None:
        while True:
            await self.check_once()
            await self.clock.sleep(self.health.interval_s)


def http_probe(cfg: UpstreamConfig) -> Probe:
    """A check of ``cfg``'s ``health.path``: one HTTP/1.1 GET on a new connection (TLS for https,
    with the upstream's ``api_key`` when it has one), bounded by ``timeout_s`` from connect to the
    status line; the connection is closed after it (``Connection: close``, nothing else read)."""
    health = cfg.health
    assert health is not None
    address = parse_upstream_url(cfg.url)
    context = ssl.create_default_context() if address.scheme == "https" else None
    auth = b"authorization: Bearer " + cfg.api_key.encode() + b"\r\n" if cfg.api_key else b""
    request = (
        b"GET " + address.prefix + health.path.encode() + b" HTTP/1.1\r\nhost: " + address.host_header
        + b"\r\nuser-agent: llm-sidecar-health\r\naccept: */*\r\n" + auth + b"connection: close\r\n\r\n"
    )  # fmt: skip
    timeout_s = health.timeout_s

    async def probe() -> str | None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(
                    address.host, address.port, ssl=context, limit=8192
                )
                writer.write(request)
                await writer.drain()
                line = await reader.readline()
        except TimeoutError:
            return f"no answer within {timeout_s:g} s"
        except (OSError, ValueError) as e:  # refused, reset, TLS; ValueError: a status line over the limit
            return f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}"
        finally:
            if writer is not None:
                writer.close()  # not awaited: close is a FIN (or a TLS close) sent on the loop
        parts = line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            return f"not an HTTP answer: {line[:80]!r}" if line else "connection closed without an answer"
        status = int(parts[1])
        return None if 200 <= status < 300 else f"GET {health.path} answered {status}"

    return probe


class HealthChecks:
    """App's checkers, one per upstream with a ``health`` entry, on one board."""

    def __init__(
        self, board: HealthBoard, clock: Clock, probe_for: Callable[[UpstreamConfig], Probe] = http_probe
    ) -> None:
        self.board = board
        self.clock = clock
        self.probe_for = probe_for
        self.checkers: dict[str, HealthChecker] = {}
        self._running = False

    def apply(self, upstreams: Mapping[str, UpstreamConfig]) -> None:
        """Make the checkers match ``upstreams`` (at start and on each reload): keep those whose
        config is the same, replace the changed ones, stop those no longer wanted."""
        for name in list(self.checkers):
            cfg = upstreams.get(name)
            if cfg is None or cfg.health is None or self.checkers[name].cfg != cfg:
                self._stop_one(name)
                if cfg is None or cfg.health is None:
                    self.board.forget(name)
        for name, cfg in upstreams.items():
            if cfg.health is not None and name not in self.checkers:
                self.checkers[name] = checker = HealthChecker(
                    name, cfg, self.board, self.clock, self.probe_for(cfg)
                )
                if self._running:
                    self._start_one(checker)

    def start(self) -> None:
        """The sidecar listens: start every loop (the first checks go at once)."""
        self._running = True
        for checker in self.checkers.values():
            self._start_one(checker)

    def _start_one(self, checker: HealthChecker) -> None:
        checker.task = asyncio.get_running_loop().create_task(
            checker.run(), name=f"health {checker.upstream}"
        )

    def _stop_one(self, name: str) -> None:
        checker = self.checkers.pop(name)
        if checker.task is not None:
            checker.task.cancel()  # its awaits are a bounded probe and a sleep: it ends at once

    async def stop(self) -> None:
        self._running = False
        tasks = [c.task for c in self.checkers.values() if c.task is not None]
        for name in list(self.checkers):
            self._stop_one(name)
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
