"""State and helpers shared by every client-side protocol (HTTP/1.1 and HTTP/2)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

from proxy.chain import Handler
from proxy.clock import Clock
from proxy.config import LimitsConfig
from proxy.errors import ProxyError, ShuttingDown
from proxy.server.driver import RequestDriver

log = logging.getLogger("llm_sidecar.front")

# After cutting the responses still under way at the end of a drain: how long their last bytes
# (an SSE error event, a final chunk) have to leave before the connections are aborted.
CUT_FLUSH_S = 1.0


class ClientConnection(Protocol):
    def close_when_idle(self) -> None:
        """Finish what is in flight, then close (graceful shutdown)."""
        ...

    def cut(self, err: ProxyError) -> int:
        """The drain ran out: end every response under way with ``err`` (an SSE stream with its
        error event, like any broken stream), stop their upstream work, close; returns how many
        responses were cut."""
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
        """Graceful shutdown: idle connections close now, busy ones after their response; what is
        still under way after ``timeout_s`` is cut (``ClientConnection.cut``)."""
        self.shutting_down = True
        for conn in list(self.connections):
            conn.close_when_idle()
        if not await self._until_closed(timeout_s):
            err = ShuttingDown(f"the sidecar is stopping and its drain_timeout_s ({timeout_s:g} s) ran out")
            cut = sum(conn.cut(err) for conn in list(self.connections))
            log.warning("drain_timeout_s (%g s) ran out: %d response(s) cut", timeout_s, cut)
            await self._until_closed(CUT_FLUSH_S)  # the error events go out, then the connections close
        for conn in list(self.connections):
            conn.abort()

    async def _until_closed(self, timeout_s: float) -> bool:
        deadline = self.loop.time() + timeout_s
        while self.connections and self.loop.time() < deadline:  # noqa: ASYNC110 - a bounded poll
            await asyncio.sleep(0.05)
        return not self.connections


def _status_lines() -> dict[int, bytes]:
    return {s.value: b"HTTP/1.1 %d %b" % (s.value, s.phrase.encode()) for s in HTTPStatus}


STATUS_LINES = _status_lines()  # without the CRLF


def status_line(status: int) -> bytes:
    """``HTTP/1.1 <status> <reason>``, without the CRLF."""
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d Status" % status
    return line
