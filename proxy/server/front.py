"""State and helpers shared by every client-side protocol (HTTP/1.1 and HTTP/2)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

import orjson

from proxy.chain import Handler
from proxy.clock import Clock
from proxy.config import LimitsConfig
from proxy.errors import ProxyError, error_body
from proxy.http import Headers, Response


class ClientConnection(Protocol):
    def close_when_idle(self) -> None:
        """Finish what is in flight, then close (graceful shutdown)."""
        ...

    def abort(self) -> None: ...


class Front:
    """What all client connections share: the chain, limits, request ids and the connection set."""

    def __init__(
        self,
        handler: Handler,
        limits: LimitsConfig,
        clock: Clock,
        loop: asyncio.AbstractEventLoop,
        max_connections: int,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.clock = clock
        self.loop = loop
        self.max_connections = max_connections
        self.connections: set[ClientConnection] = set()
        self.shutting_down = False
        self._rid_prefix = os.urandom(6).hex().encode() + b"-"
        self._rid_counter = 0
        # Answered by the front itself, before the chain: liveness for systemd/k8s probes.
        self.local: dict[bytes, bytes] = {b"/healthz": orjson.dumps({"status": "ok"})}
        # Makes the protocol of a new HTTP/2 connection (set by App when http2.enabled).
        self.h2_factory: Callable[[], asyncio.Protocol] | None = None

    def admit(self, conn: ClientConnection, transport: asyncio.Transport) -> str | None:
        """Register a new client connection and return its peer ``host:port``; or abort the
        transport and return None when over ``max_connections`` or shutting down."""
        if len(self.connections) >= self.max_connections or self.shutting_down:
            transport.abort()
            return None
        self.connections.add(conn)
        peer = transport.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def set_handler(self, handler: Handler) -> None:
        """Swap the chain (reload): requests already in flight finish on the old one."""
        self.handler = handler

    def next_request_id(self) -> bytes:
        self._rid_counter += 1
        return b"%b%d" % (self._rid_prefix, self._rid_counter)

    def switch_to_h2(self, transport: asyncio.Transport, data: bytes) -> bool:
        """Hand a connection to the HTTP/2 front, replaying ``data`` (from the preface on).

        The caller has let go of the connection first. False when HTTP/2 is off."""
        factory = self.h2_factory
        if factory is None:
            return False
        protocol = factory()
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if data:
            protocol.data_received(data)
        return True

    async def drain(self, timeout_s: float) -> None:
        """Graceful shutdown: idle connections close now, busy ones after their response."""
        self.shutting_down = True
        for conn in list(self.connections):
            conn.close_when_idle()
        deadline = self.loop.time() + timeout_s
        while self.connections and self.loop.time() < deadline:  # noqa: ASYNC110 - a bounded poll
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()


def error_response(err: ProxyError) -> Response:
    """The one place a typed error becomes what the client sees (OpenAI error shape)."""
    headers = Headers([(b"content-type", b"application/json")])
    headers.extend(err.headers)
    return Response(err.status, headers, error_body(err))


def _status_lines() -> dict[int, bytes]:
    return {s.value: b"HTTP/1.1 %d %b" % (s.value, s.phrase.encode()) for s in HTTPStatus}


STATUS_LINES = _status_lines()  # without the CRLF


def status_line(status: int) -> bytes:
    """``HTTP/1.1 <status> <reason>``, without the CRLF."""
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Status" % status
    return line
