"""The admin listener: a second port, never the proxy's, served by the sidecar's own HTTP/1.1 front
(its parser, limits and timeouts) with a handler of its own instead of the chain.

- ``GET /metrics``: the process's registry in the Prometheus text format;
- ``GET /healthz``: the event loop answers (never needs the token: liveness probes carry none);
- ``GET /readyz``: 200 ``{"ready": true}`` when every route can be served (see :func:`problems`),
  else 503 with ``{"ready": false, "problems": [...]}`` naming what is not ready.

With ``admin.token`` set, every path but ``/healthz`` needs ``Authorization: Bearer <token>``
(401 otherwise). This is where later admin actions go.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Mapping
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from proxy.clock import Clock
from proxy.config import AdminConfig, LimitsConfig, RouteConfig
from proxy.http import Request, Response
from proxy.metrics import BreakerView
from proxy.server.front import Front
from proxy.server.h1 import H1Connection

# Probes and scrapers send small GETs: the admin port holds few connections and no large request.
ADMIN_LIMITS = LimitsConfig(
    max_header_bytes=16384,
    max_body_bytes=65536,
    header_timeout_s=10.0,
    body_timeout_s=10.0,
    keepalive_timeout_s=75.0,
    max_pipelined=4,
)
ADMIN_MAX_CONNECTIONS = 64
_METHODS = ("GET", "HEAD")
_METRICS_TYPE = CONTENT_TYPE_LATEST.encode()


class Serving(Protocol):
    """What readiness reads (App): the routes in force and the breakers of its build."""

    def routes(self) -> tuple[RouteConfig, ...]: ...

    def breakers(self) -> Mapping[str, BreakerView]: ...

    def stopping(self) -> bool: ...

    def middleware_problems(self) -> list[str]: ...

    def upstreams_down(self) -> Mapping[str, str]:
        """Upstreams their active health check marked down, with why (proxy/health.py)."""
        ...


def problems(serving: Serving) -> list[str]:
    """What keeps the sidecar from being ready: each route needs a target (of weight > 0, its own or
    a fallback route's) whose upstream's breaker is not open and that its health check (if any) has
    not marked down. No breaker configured: none is open.
    A sidecar that is stopping (draining) is not ready: new work should go elsewhere. A middleware
    with a ``readiness() -> list[str]`` method adds what it finds (e.g. a Redis not answering)."""
    breakers = serving.breakers()
    down = serving.upstreams_down()
    routes = {r.model: r for r in serving.routes()}
    found: list[str] = []
    if serving.stopping():
        found.append("stopping: finishing the requests in flight, taking no new connections")
    for route in routes.values():
        chain = [route, *(routes[f] for f in route.fallbacks if f in routes)]
        closed, opened, failed = False, [], []
        for r in chain:
            for t in r.targets:
                if t.weight <= 0:
                    continue
                breaker = breakers.get(t.upstream)
                if t.upstream in down:
                    failed.append(t.upstream)
                elif breaker is not None and breaker.state == "open" and breaker.retry_after() > 0:
                    opened.append(t.upstream)
                else:
                    closed = True
        if not closed:
            why = [f"breaker of upstream {', '.join(dict.fromkeys(opened))} open"] if opened else []
            why += [f"upstream {u} failed its health check: {down[u]}" for u in dict.fromkeys(failed)]
            found.append(f"route {route.model}: no target available ({'; '.join(why)})")
    found.extend(serving.middleware_problems())
    return found


class AdminServer:
    """``/metrics`` and ``/readyz`` (``/healthz`` the front's driver answers itself, before any
    handler, so it never needs the token)."""

    def __init__(
        self,
        cfg: AdminConfig,
        registry: CollectorRegistry,
        serving: Serving,
        clock: Clock,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.serving = serving
        self.loop = loop
        self._expected = f"Bearer {cfg.token}".encode() if cfg.token else None
        self.front = Front(self.handle, ADMIN_LIMITS, clock, loop, ADMIN_MAX_CONNECTIONS)
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        """Listen on ``admin.address`` (on the running loop). Raises OSError when it cannot."""
        front = self.front
        self._server = server = await self.loop.create_server(
            lambda: H1Connection(front), self.cfg.host, self.cfg.port, reuse_address=True
        )
        host, port = server.sockets[0].getsockname()[:2]
        self.address = (host, port)

    @property
    def url(self) -> str:
        assert self.address is not None
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def stop(self) -> None:
        server = self._server
        if server is not None:
            server.close()
            await self.front.drain(1.0)
            await server.wait_closed()

    async def handle(self, request: Request) -> Response:
        path = request.path
        if path not in ("/metrics", "/readyz"):
            return Response.json(404, {"error": f"no admin path {path}: /metrics, /healthz, /readyz"})
        if request.method not in _METHODS:
            response = Response.json(405, {"error": f"{path} answers GET and HEAD"})
            response.headers.append((b"allow", b"GET, HEAD"))
            return response
        expected = self._expected
        if expected is not None:
            given = request.headers.get(b"authorization") or b""
            if not hmac.compare_digest(given, expected):
                response = Response.json(
                    401, {"error": "this admin path needs 'Authorization: Bearer <admin.token>'"}
                )
                response.headers.append((b"www-authenticate", b'Bearer realm="llm-sidecar admin"'))
                return response
        if path == "/metrics":
            return Response(
                200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], generate_latest(self.registry)
            )
        found = problems(self.serving)
        if found:
            return Response.json(503, {"ready": False, "problems": found})
        return Response.json(200, {"ready": True})
