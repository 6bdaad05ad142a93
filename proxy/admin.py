"""The admin listener: a second port, served by aiohttp (off the hot path), never the proxy's.

- ``GET /metrics``: the process's registry in the Prometheus text format;
- ``GET /healthz``: the event loop answers (never needs the token: liveness probes carry none);
- ``GET /readyz``: 200 ``{"ready": true}`` when every route can be served (see :func:`problems`),
  else 503 with ``{"ready": false, "problems": [...]}`` naming what is not ready.

With ``admin.token`` set, every path but ``/healthz`` needs ``Authorization: Bearer <token>``
(401 otherwise). This is where later admin actions go.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

from proxy.config import AdminConfig, RouteConfig
from proxy.metrics import BreakerView

log = logging.getLogger("llm_sidecar.admin")

_OPEN_PATHS = frozenset({"/healthz"})


class Serving(Protocol):
    """What readiness reads (App): the routes in force and the breakers of its build."""

    def routes(self) -> tuple[RouteConfig, ...]: ...

    def breakers(self) -> Mapping[str, BreakerView]: ...

    def stopping(self) -> bool: ...

    def middleware_problems(self) -> list[str]: ...


def problems(serving: Serving) -> list[str]:
    """What keeps the sidecar from being ready: each route needs a target (of weight > 0, its own or
    a fallback route's) whose upstream's breaker is not open. No breaker configured: none is open.
    A sidecar that is stopping (draining) is not ready: new work should go elsewhere. A middleware
    with a ``readiness() -> list[str]`` method adds what it finds (e.g. a Redis not answering)."""
    breakers = serving.breakers()
    routes = {r.model: r for r in serving.routes()}
    found: list[str] = []
    if serving.stopping():
        found.append("stopping: finishing the requests in flight, taking no new connections")
    for route in routes.values():
        chain = [route, *(routes[f] for f in route.fallbacks if f in routes)]
        closed, opened = False, []
        for r in chain:
            for t in r.targets:
                if t.weight <= 0:
                    continue
                breaker = breakers.get(t.upstream)
                if breaker is not None and breaker.state == "open" and breaker.retry_after() > 0:
                    opened.append(t.upstream)
                else:
                    closed = True
        if not closed:
            names = ", ".join(dict.fromkeys(opened))
            found.append(f"route {route.model}: no target available (breaker of upstream {names} open)")
    found.extend(serving.middleware_problems())
    return found


class AdminServer:
    def __init__(self, cfg: AdminConfig, registry: CollectorRegistry, serving: Serving) -> None:
        self.cfg = cfg
        self.registry = registry
        self.serving = serving
        self._expected = f"Bearer {cfg.token}".encode() if cfg.token else None
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        """Listen on ``admin.address`` (on the running loop). Raises OSError when it cannot."""
        runner = self._runner
        await runner.setup()
        try:
            await web.TCPSite(runner, self.cfg.host, self.cfg.port, reuse_address=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        host, port = runner.addresses[0][:2]
        self.address = (host, port)

    @property
    def url(self) -> str:
        assert self.address is not None
        host, port = self.address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def stop(self) -> None:
        await self._runner.cleanup()

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        expected = self._expected
        if expected is not None and request.path not in _OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return web.json_response(
                    {"error": "this admin path needs 'Authorization: Bearer <admin.token>'"},
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="llm-sidecar admin"'},
                )
        return await handler(request)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        found = problems(self.serving)
        if found:
            return web.json_response({"ready": False, "problems": found}, status=503)
        return web.json_response({"ready": True})
