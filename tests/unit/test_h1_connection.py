"""proxy.server.h1.H1Connection driven in process: bytes in through ``data_received``, bytes out
through a fake transport, the chain replaced by a plain handler. For what the raw-socket tests
(tests/integration/test_http1_front.py) cannot see from outside: flow control and parser edges."""

from __future__ import annotations

import asyncio
from typing import cast

from proxy.clock import MonotonicClock
from proxy.config import LimitsConfig
from proxy.http import Headers, Request, Response
from proxy.server.front import Front
from proxy.server.h1 import H1Connection
from proxy.upstream.h1 import H1Connection as UpstreamConnection
from proxy.upstream.h1 import UpstreamBody
from tests.fake_transport import FakeTransport


class FakeUpstream:
    """What an UpstreamBody needs of its upstream connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def abort(self) -> None:
        pass


class Harness:
    def __init__(self, limits: LimitsConfig | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.requests: list[Request] = []
        self.responses: list[Response] = []
        front = Front(self.handle, limits or LimitsConfig(), MonotonicClock(), self.loop, 10)
        self.conn = H1Connection(front)
        self.transport = FakeTransport()
        self.conn.connection_made(cast(asyncio.Transport, self.transport))

    async def handle(self, request: Request) -> Response:
        self.requests.append(request)
        if self.responses:
            return self.responses.pop(0)
        return Response(200, Headers(), b"ok")

    async def feed(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.conn.data_received(piece)
        for _ in range(5):
            await asyncio.sleep(0)


async def test_an_unfinished_header_line_is_refused_once_past_the_limit() -> None:
    h = Harness(LimitsConfig(max_header_bytes=1024))
    await h.feed(b"GET /v1/models HTTP/1.1\r\nx-endless: ", *[b"a" * 300] * 3)
    assert not h.transport.written
    await h.feed(b"a" * 300)  # 1200 bytes of a header line that has not ended yet
    assert h.transport.written.startswith(b"HTTP/1.1 431 ")
    assert h.transport.eof_written and not h.requests  # half-closed: the lingering close


async def test_after_an_error_answer_the_connection_lingers_then_closes() -> None:
    h = Harness(LimitsConfig(max_body_bytes=10))
    await h.feed(b"POST /v1/x HTTP/1.1\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
    answer = bytes(h.transport.written)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert h.transport.eof_written and h.transport.reading and not h.transport.closed
    await h.feed(b"x" * 50000)  # the rest of the body the client was already sending: dropped
    assert bytes(h.transport.written) == answer and not h.requests
    h.conn._on_timer()  # not yet due: nothing happens
    assert not h.transport.closed
    h.conn._deadline = h.conn.loop.time() - 1  # the lingering time is over
    h.conn._on_timer()
    assert h.transport.closed


async def test_a_head_spread_over_reads_within_the_limit_is_served() -> None:
    h = Harness(LimitsConfig(max_header_bytes=1024))
    head = b"GET /v1/models HTTP/1.1\r\nx-a: " + b"a" * 900 + b"\r\n\r\n"
    await h.feed(*(head[i : i + 100] for i in range(0, len(head), 100)))
    assert h.transport.written.startswith(b"HTTP/1.1 200 ")
    assert len(h.requests) == 1


async def test_an_upgrade_request_keeps_its_body_and_what_follows_is_a_new_request() -> None:
    h = Harness()
    await h.feed(
        b"POST /v1/chat/completions HTTP/1.1\r\nconnection: upgrade\r\nupgrade: h2c\r\n"
        b"content-length: 2\r\n\r\n{}GET /v1/models HTTP/1.1\r\n\r\n"
    )
    assert [(r.method, r.path, r.body) for r in h.requests] == [
        ("POST", "/v1/chat/completions", b"{}"),
        ("GET", "/v1/models", b""),
    ]
    assert h.requests[0].headers.get(b"upgrade") is None
    assert h.transport.written.count(b"HTTP/1.1 200 ") == 2


async def test_an_overlong_request_id_is_replaced_not_joined() -> None:
    h = Harness()
    await h.feed(b"GET /v1/models HTTP/1.1\r\nx-request-id: " + b"r" * 300 + b"\r\n\r\n")
    ids = h.requests[0].headers.get_all(b"x-request-id")
    assert ids == [h.requests[0].ctx.request_id] and len(ids[0]) < 200


async def test_a_piped_body_starts_paused_when_the_client_is_behind() -> None:
    """The client has not read an earlier answer (the transport asked us to pause writing): the
    next streamed answer must not pull from its upstream into memory either."""
    h = Harness()
    upstream = FakeUpstream(h.loop)
    body = UpstreamBody(cast(UpstreamConnection, upstream), [b"data: 1\n\n"], None)
    h.responses.append(Response(200, Headers(), body))
    h.conn.pause_writing()
    await h.feed(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}")
    assert b"data: 1" in h.transport.written
    assert not upstream.reading
    h.conn.resume_writing()
    assert upstream.reading
    body.end(None)
    assert h.transport.written.endswith(b"0\r\n\r\n")
