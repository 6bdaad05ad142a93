"""State and helpers shared by every client-side protocol (HTTP/1.1 and HTTP/2)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

from proxy.chain import Handler
from proxy.clock import Clock
from proxy.config import LimitsConfig
from proxy.server.driver import RequestDriver


class ClientConnection(Protocol):
    def close_when_idle(self) -> None:
        """Finish what is in flight, then close (graceful shutdown)."""
        ...

    def abort(self) -> None: ...


class Front:
    """What all client connections share: the request driver (the chain, request ids, the
    answers the sidecar gives itself), limits and the connection set."""

    def __init__(
        self,
        handler: Handler,
        limits: LimitsConfig,
        clock: Clock,
        loop: asyncio.AbstractEventLoop,
        max_connections: int,
    ) -> None:
        self.driver = RequestDriver(handler, limits, clock)
        self.limits = limits
        self.clock = clock
        self.loop = loop
        self.max_connections = max_connections
        self.connections: set[ClientConnection] = set()
        self.shutting_down = False
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
        self.driver.handler = handler

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


def _status_lines() -> dict[int, bytes]:
    return {s.value: b"HTTP/1.1 %d %b" % (s.value, s.phrase.encode()) for s in HTTPStatus}


STATUS_LINES = _status_lines()  # without the CRLF


def status_line(status: int) -> bytes:
    """``HTTP/1.1 <status> <reason>``, without the CRLF."""
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Status" % status
    return line
