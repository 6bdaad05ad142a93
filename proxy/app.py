"""Assembly: the long-lived resources, and what each config builds on them.

What outlives a config: the listener and the front (its connections), the upstream pools (reused
by a new config that keeps the upstream as it was), and the state of every middleware whose
config did not change (buckets, breakers, budgets), handed to its successor through
``BuildContext.previous``. What a config builds (:class:`Build`): the router, the middleware and
the chain composed of them. A reload builds the whole new chain first, then swaps it in one
assignment (``RequestDriver.swap``); requests in flight finish on the old one, which is closed
once its last response is complete: the middleware not carried over are closed, and the pools no
config uses any more drain (their in-flight exchanges finish) and close.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import socket
import ssl
from collections.abc import Coroutine, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from proxy.access_format import USAGE_AT, AccessEntry, AccessSink, log_record_sink
from proxy.access_log import AccessLog
from proxy.chain import Handler, compose
from proxy.clock import Clock, MonotonicClock
from proxy.config import Config, RouteConfig, UpstreamConfig
from proxy.direct import Senders
from proxy.forward import Forwarder
from proxy.health import HealthBoard, HealthChecks
from proxy.metrics import BreakerView, Metrics, MetricsScope, breaker_level
from proxy.registry import BuildContext
from proxy.routing import Router
from proxy.server.front import Front
from proxy.server.h1 import H1Connection
from proxy.server.h2 import H2Connection
from proxy.server.tls import AlpnSwitch, server_context
from proxy.tasks import BackgroundTasks
from proxy.upstream.base import Upstream
from proxy.upstream.factory import make_upstream

if TYPE_CHECKING:
    from proxy.admin import AdminServer

log = logging.getLogger("llm_sidecar")

# Config sections read only at start: a reload that changes them says so and keeps them as they are.
RESTART_ONLY = ("listen", "http2", "admin")


class ReloadError(Exception):
    """The new config could not be built; the old one keeps serving."""


class BuildError(Exception):
    """A middleware could not be built from its (valid) config: the message names it."""


class Build:
    """What one config builds: its router, its middleware and the chain they make."""

    def __init__(
        self,
        config: Config,
        upstreams: dict[str, Upstream],
        router: Router,
        middleware: list[Any],
        carried: list[Any],
        handler: Handler,
    ) -> None:
        self.config = config
        self.upstreams = upstreams
        self.router = router
        self.middleware = middleware
        self.carried = carried  # the previous build's middleware whose state these took over
        self.handler = handler

    def fresh(self) -> list[Any]:
        """Its middleware that did not take a predecessor's state (they start their own work)."""
        return [mw for mw, prev in zip(self.middleware, self.carried, strict=True) if prev is None]


class App:
    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        access_sink: AccessSink | None = None,
    ) -> None:
        self.loop = loop
        self.clock = clock or MonotonicClock()
        self.rng = rng or random.Random()
        self.access_sink = access_sink  # where access lines go (the log thread's queue)
        self.reloads = {"ok": 0, "failed": 0}  # read by the metrics
        # Counted by the driver and the body tap, rendered when /metrics is scraped; off with the
        # admin listener. Middleware counters live in the scope either way (read by nobody when off).
        self.metrics: Metrics | None = None
        self.scope = MetricsScope()
        if config.admin.enabled:
            self.metrics = Metrics(self.clock, config.admin.duration_buckets_s)
            self.scope = self.metrics.scope
        # The process's background work (BuildContext.tasks), drained by stop(); outlives reloads.
        self.tasks = BackgroundTasks(self.scope)
        # Active health checks: the board every build's router and /readyz read, and the loops.
        self.health_board = HealthBoard(self.scope)
        self.health = HealthChecks(self.health_board, self.clock)
        self.health.apply(config.upstreams)
        upstreams: dict[str, Upstream] = {
            name: make_upstream(name, cfg, loop) for name, cfg in config.upstreams.items()
        }
        self.build = self._build(config, upstreams, None)
        self.front = Front(self.build.handler, config.limits, self.clock, loop, config.listen.max_connections)
        self.front.driver.server_timing = config.server_timing
        self.front.driver.access = self._access(config)
        if config.http2.enabled:
            self.front.h2_factory = partial(H2Connection, self.front, config.http2)
        self.server: asyncio.Server | None = None
        self.admin: AdminServer | None = None
        if self.metrics is not None:
            # Imported here: prometheus_client costs ~4 MiB of RSS, paid only with admin on.
            from proxy.admin import AdminServer
            from proxy.metrics_export import registry_for

            self.metrics.routes = frozenset(self.build.router.models)
            self.front.driver.metrics = self.metrics
            self.admin = AdminServer(config.admin, registry_for(self.metrics, self), self, self.clock, loop)
        self._tasks: set[asyncio.Task[None]] = set()  # closing retired builds; stop() waits for them
        # Builds a reload replaced whose last response is not complete yet: (old, new, pools to close).
        self._retired: dict[int, tuple[Build, Build, list[Upstream]]] = {}

    @property
    def config(self) -> Config:
        return self.build.config

    # -- building --------------------------------------------------------------------------------
    def _build(self, config: Config, upstreams: dict[str, Upstream], previous: Build | None) -> Build:
        router = Router(config.routes, self.health_board.down)
        senders = Senders(upstreams, self.clock)
        forwarder = Forwarder(router, upstreams, config.fallback_upstream, self.rng, self.clock)
        available = []
        if previous is not None:
            available = list(zip(previous.config.middleware, previous.middleware, strict=True))
        middleware: list[Any] = []
        carried: list[Any] = []
        for i, entry in enumerate(config.middleware):
            prev = None
            for i, (old_entry, old_mw) in enumerate(available):
                if old_entry.type == entry.type and old_entry.config == entry.config:
                    prev = old_mw
                    del available[i]
                    break
            ctx = BuildContext(
                clock=self.clock,
                rng=self.rng,
                route_models=router.models,
                router=router,
                upstreams=tuple(upstreams),
                previous=prev,
                metrics=self.scope,
                tasks=self.tasks,
                senders=senders,
            )
            try:
                middleware.append(entry.factory(entry.config, ctx))
            except Exception as e:
                # (A middleware built earlier in this loop that started work in __init__ is a bug
                # of that middleware: start work in start(), which runs after a successful build.)
                raise BuildError(f"middleware[{i}] ({entry.type}): {e}") from e
            carried.append(prev)
        return Build(config, upstreams, router, middleware, carried, compose(middleware, forwarder))

    def _access(self, config: Config) -> AccessLog | None:
        """The driver's accounting of each answer, for the access log's lines and the metrics'
        streams (the metrics count whole answers and errors themselves, in the driver)."""
        lines = (self.access_sink or log_record_sink) if config.log.access_log else None
        metrics = self.metrics
        if metrics is None:
            return AccessLog(self.clock, config.log, lines) if lines is not None else None
        outcome = metrics.outcome
        if lines is None:
            return AccessLog(self.clock, None, outcome, whole=False)

        def both(entry: AccessEntry) -> None:
            tokens = outcome(entry)
            if tokens is not None:  # read once: the log thread takes them as they are
                entry = (*entry[:USAGE_AT], tokens, *entry[USAGE_AT + 1 :])
            lines(entry)

        return AccessLog(self.clock, config.log, lines, stream_sink=both)

    async def reload(self, config: Config) -> list[str]:
        """Build ``config`` in full, then serve new requests with it. Returns what it did not apply
        (sections that need a restart). Raises ReloadError, with nothing changed, when the new
        chain cannot be built."""
        old = self.build
        notes = [
            f"{name}: changed, but it takes a restart; still as before"
            for name in RESTART_ONLY
            if getattr(config, name) != getattr(old.config, name)
        ]
        upstreams: dict[str, Upstream] = {}
        opened: list[Upstream] = []
        for name, cfg in config.upstreams.items():
            pool = old.upstreams.get(name)
            if pool is None or _pool_config(old.config.upstreams[name]) != _pool_config(cfg):
                pool = make_upstream(name, cfg, self.loop)
                opened.append(pool)
            upstreams[name] = pool
        try:
            build = self._build(config, upstreams, old)
            for mw in build.fresh():
                start = getattr(mw, "start", None)
                if start is not None:
                    await start()
        except Exception as e:
            for pool in opened:
                await pool.close()
            raise ReloadError(f"{type(e).__name__}: {e}") from e
        self.build = build
        self.health.apply(config.upstreams)
        if self.metrics is not None:
            self.metrics.routes = frozenset(build.router.models)
        self.front.limits = config.limits  # (new connections)
        self.front.driver.limits = config.limits
        self.front.driver.server_timing = config.server_timing
        self.front.driver.access = self._access(config)
        retired = self.front.driver.swap(build.handler)
        gone = [pool for name, pool in old.upstreams.items() if upstreams.get(name) is not pool]
        self._retired[id(old)] = (old, build, gone)
        retired.retire(partial(self._spawn_close, id(old)))
        return notes

    def _spawn_close(self, key: int) -> None:
        retired = self._retired.pop(key, None)
        if retired is not None:
            self._spawn(self._close_retired(*retired))

    async def _close_retired(self, old: Build, new: Build, pools: list[Upstream]) -> None:
        """The last response of ``old`` is complete: close what the new build did not take."""
        taken = {id(mw) for mw in new.carried if mw is not None}
        for mw in old.middleware:
            if id(mw) not in taken:
                await _aclose(mw)
        for pool in pools:
            await pool.close()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- serving ---------------------------------------------------------------------------------
    async def start(self) -> None:
        """Listen, then let each middleware with an ``async def start(self)`` start its background
        work on this loop (e.g. ``circuit_breaker.shared``'s Redis sync)."""
        await self._listen()
        for mw in self.build.middleware:
            start = getattr(mw, "start", None)
            if start is not None:
                await start()
        self.health.start()
        await self._start_admin()

    async def _start_admin(self) -> None:
        admin = self.admin
        if admin is None:
            return
        try:
            await admin.start()
        except OSError as e:
            # The proxy serves on: losing it for its metrics port would be the worse failure (and
            # /readyz not answering already tells a probe). Several sidecars on one host (the
            # default 127.0.0.1:9090) need an admin.address each, or admin.enabled: false.
            log.error(
                "admin listener: cannot listen on %s (%s); serving without /metrics and /readyz: "
                "set admin.address (port 0: any free one) or admin.enabled: false",
                self.config.admin.address,
                e.strerror or e,
            )
            self.admin = None
            return
        token = ", token required" if self.config.admin.token else ""
        log.info("admin listener on %s (/metrics, /healthz, /readyz%s)", admin.url, token)

    async def _listen(self) -> None:
        listen = self.config.listen
        front = self.front
        if listen.tls is None:
            self.server = await self.loop.create_server(
                lambda: H1Connection(front),
                listen.host,
                listen.port,
                backlog=listen.backlog,
                reuse_address=True,
            )
            return
        context: ssl.SSLContext = server_context(listen.tls, self.config.http2.enabled)
        self.server = await self.loop.create_server(
            lambda: AlpnSwitch(front),
            listen.host,
            listen.port,
            backlog=listen.backlog,
            reuse_address=True,
            ssl=context,
            ssl_handshake_timeout=self.config.limits.header_timeout_s,
        )

    @property
    def address(self) -> tuple[str, int]:
        assert self.server is not None
        sock: socket.socket = self.server.sockets[0]
        host, port = sock.getsockname()[:2]
        return host, port

    # -- what the metrics and readiness read (scrape time) ----------------------------------------
    def in_flight(self) -> int:
        return self.front.driver.in_flight()

    def client_connections(self) -> int:
        return len(self.front.connections)

    def pools(self) -> Mapping[str, Upstream]:
        return self.build.upstreams

    def routes(self) -> tuple[RouteConfig, ...]:
        return self.config.routes

    def stopping(self) -> bool:
        return self.front.shutting_down

    def upstreams_down(self) -> Mapping[str, str]:
        return self.health_board.down

    def middleware_problems(self) -> list[str]:
        """What the build's middleware with a ``readiness() -> list[str]`` say keeps them from serving
        (the seam for "every Redis the config needs answered recently")."""
        found: list[str] = []
        for entry, mw in zip(self.config.middleware, self.build.middleware, strict=True):
            readiness = getattr(mw, "readiness", None)
            if readiness is None:
                continue
            try:
                found.extend(f"middleware {entry.type}: {p}" for p in readiness())
            except Exception as e:
                log.exception("readiness of middleware %s failed", entry.type)
                found.append(f"middleware {entry.type}: its readiness check failed ({type(e).__name__}: {e})")
        return found

    def breakers(self) -> Mapping[str, BreakerView]:
        """Each upstream's breaker, from the build's ``circuit_breaker`` middleware (the one most
        open where several are configured); empty without one."""
        found: dict[str, BreakerView] = {}
        for mw in self.build.middleware:
            breakers = getattr(mw, "breakers", None)
            if not isinstance(breakers, dict):
                continue
            for name, breaker in breakers.items():
                seen = found.get(name)
                if seen is None or breaker_level(breaker) > breaker_level(seen):
                    found[name] = breaker
        return found

    def describe_routes(self) -> str:
        """Routes and chain, as the start-up and reload lines show them."""
        config = self.config
        routes = "; ".join(
            f"{r.model} → " + ", ".join(f"{t.upstream}/{t.model} ({t.weight:g})" for t in r.targets)
            for r in config.routes
        )
        chain = " → ".join([*(e.type for e in config.middleware), "forward"])
        return f"routes: {routes} | chain: {chain}"

    def describe(self) -> str:
        """The one start-up line: address, routes and chain."""
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        scheme = "https" if self.config.listen.tls is not None else "http"
        versions = "HTTP/1.1 + HTTP/2" if self.config.http2.enabled else "HTTP/1.1"
        where = f"{scheme}://{shown}:{port} ({versions})"
        return f"llm-sidecar listening on {where} | {self.describe_routes()}"

    async def stop(self, drain_s: float | None = None) -> None:
        """Stop listening, let what is in flight finish, then the background tasks, all within
        ``drain_timeout_s`` (the tasks get what the front's drain left); close all."""
        budget = self.config.drain_timeout_s if drain_s is None else drain_s
        deadline = self.loop.time() + budget
        if self.server is not None:
            self.server.close()
        # The admin listener stays up through the drain: /readyz says "stopping", /metrics shows it.
        await self.front.drain(budget)
        await self.health.stop()  # (checks kept routing right while requests were still finishing)
        await self.tasks.drain(max(0.0, deadline - self.loop.time()))
        if self.admin is not None:
            await self.admin.stop()
        await asyncio.sleep(0)  # the aborted connections' connection_lost callbacks
        for key in list(self._retired):  # still busy at the end of the drain: closed all the same
            self._spawn_close(key)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for upstream in self.build.upstreams.values():
            await upstream.close()
        for mw in self.build.middleware:
            await _aclose(mw)


def _pool_config(cfg: UpstreamConfig) -> UpstreamConfig:
    """What an upstream's pool is built from: its entry less the health check (changing only
    ``health`` on a reload keeps the pool and its connections)."""
    return dataclasses.replace(cfg, health=None)


async def _aclose(mw: Any) -> None:
    aclose = getattr(mw, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.exception("closing middleware %s failed", type(mw).__name__)
