"""A small scripted HTTP/2 (h2c) upstream for tests, on the ``h2`` state machine under asyncio.

Each complete request calls ``handler(conn, sid, headers, body)``; the handler answers
(``conn.respond``), refuses (``conn.refuse``), sends GOAWAY (``conn.goaway``), freezes the
connection (``conn.frozen = True``: nothing more is read or answered, PINGs included) or does
nothing. ``server.conns`` lists every connection accepted, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

import orjson
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded
from hyperframe.frame import GoAwayFrame

Handler = Callable[["ScriptedConn", int, dict[bytes, bytes], bytes], None]


class ScriptedConn(asyncio.Protocol):
    def __init__(self, server: ScriptedH2) -> None:
        self.server = server
        self.index = len(server.conns)
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.frozen = False
        self.requests: dict[int, tuple[dict[bytes, bytes], list[bytes]]] = {}
        self.seen: list[int] = []  # stream ids of complete requests, in order
        self.lost = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.frozen:
            return
        for event in self.h2.receive_data(data):
            if isinstance(event, RequestReceived):
                self.requests[event.stream_id] = (dict(event.headers or []), [])
            elif isinstance(event, DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                self.requests[event.stream_id][1].append(event.data)
            elif isinstance(event, StreamEnded):
                headers, body = self.requests[event.stream_id]
                self.seen.append(event.stream_id)
                self.server.handler(self, event.stream_id, headers, b"".join(body))
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    # -- what a handler does -----------------------------------------------------------------------
    def respond(self, sid: int, payload: Any, status: int = 200) -> None:
        body = orjson.dumps(payload)
        headers = [(b":status", b"%d" % status), (b"content-type", b"application/json")]
        self.h2.send_headers(sid, [*headers, (b"content-length", b"%d" % len(body))])
        self.h2.send_data(sid, body, end_stream=True)
        self.flush()

    def refuse(self, sid: int) -> None:
        self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
        self.flush()

    def goaway(self, last_stream_id: int) -> None:
        """GOAWAY NO_ERROR, written past h2 (which would refuse to answer the streams it lets finish)."""
        self.flush()
        assert self.transport is not None
        self.transport.write(GoAwayFrame(0, last_stream_id=last_stream_id, error_code=0).serialize())


class ScriptedH2:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.conns: list[ScriptedConn] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> ScriptedH2:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for conn in self.conns:
            if conn.transport is not None:
                conn.transport.abort()

    def _accept(self) -> ScriptedConn:
        conn = ScriptedConn(self)
        self.conns.append(conn)
        return conn

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
