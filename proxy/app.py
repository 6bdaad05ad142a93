"""Assembly: one object graph built from a Config — pools, router, chain, front, listener."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
from functools import partial
from typing import Any

from proxy.access_log import AccessLog
from proxy.chain import Handler, compose
from proxy.clock import Clock, MonotonicClock
from proxy.config import Config
from proxy.forward import Forwarder
from proxy.registry import BuildContext
from proxy.routing import Router
from proxy.server.front import Front
from proxy.server.h1 import H1Connection
from proxy.server.h2 import H2Connection
from proxy.server.tls import AlpnSwitch, server_context
from proxy.upstream.base import Upstream
from proxy.upstream.factory import make_upstream

log = logging.getLogger("llm_sidecar")


class App:
    def __init__(
        self,
        config: Config,
        loop: asyncio.AbstractEventLoop,
        clock: Clock | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.loop = loop
        self.clock = clock or MonotonicClock()
        self.rng = rng or random.Random()
        self.upstreams: dict[str, Upstream] = {
            name: make_upstream(name, cfg, loop) for name, cfg in config.upstreams.items()
        }
        self.router = Router(config.routes)
        self.middleware: list[Any] = []
        handler = self._build_chain()
        self.front = Front(handler, config.limits, self.clock, loop, config.listen.max_connections)
        if config.http2.enabled:
            self.front.h2_factory = partial(H2Connection, self.front, config.http2)
        self.server: asyncio.Server | None = None

    def _build_chain(self) -> Handler:
        forwarder = Forwarder(self.router, self.upstreams, self.config.fallback_upstream, self.rng)
        ctx = BuildContext(
            clock=self.clock,
            rng=self.rng,
            route_models=self.router.models,
            router=self.router,
            upstreams=tuple(self.upstreams),
        )
        self.middleware = [entry.factory(entry.config, ctx) for entry in self.config.middleware]
        chain: list[Any] = list(self.middleware)
        if self.config.log.access_log:
            chain.insert(0, AccessLog(self.clock))  # first, so it sees every status the chain returns
        return compose(chain, forwarder)

    async def start(self) -> None:
        """Listen, then let each middleware with an ``async def start(self)`` start its background
        work on this loop (e.g. ``circuit_breaker.shared``'s Redis sync)."""
        await self._listen()
        for mw in self.middleware:
            start = getattr(mw, "start", None)
            if start is not None:
                await start()

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

    def describe(self) -> str:
        """The one start-up line: address, routes and chain."""
        host, port = self.address
        shown = f"[{host}]" if ":" in host else host
        routes = "; ".join(
            f"{r.model} → " + ", ".join(f"{t.upstream}/{t.model} ({t.weight:g})" for t in r.targets)
            for r in self.config.routes
        )
        chain = " → ".join([*(e.type for e in self.config.middleware), "forward"])
        scheme = "https" if self.config.listen.tls is not None else "http"
        versions = "HTTP/1.1 + HTTP/2" if self.config.http2.enabled else "HTTP/1.1"
        where = f"{scheme}://{shown}:{port} ({versions})"
        return f"llm-sidecar listening on {where} | routes: {routes} | chain: {chain}"

    async def stop(self, drain_s: float = 10.0) -> None:
        if self.server is not None:
            self.server.close()
        await self.front.drain(drain_s)
        for upstream in self.upstreams.values():
            await upstream.close()
        for mw in self.middleware:
            aclose = getattr(mw, "aclose", None)
            if aclose is not None:
                await aclose()
