"""A recorded upstream response, split at every byte offset and in one piece, through the upstream
connection into each front's writer: the client gets the same complete response every time.

What is varied, for each recording (SSE, plain chunked, Content-Length, empty bodies):
- the upstream side: an HTTP/1.1 connection (``proxy.upstream.h1``) or an HTTP/2 one
  (``proxy.upstream.h2_conn``; the recording is then the server's frames, the SETTINGS handshake
  aside);
- how the bytes arrive: in one piece, in two at every offset, or byte by byte;
- when they arrive relative to the front: all before the chain returns the response (so the end
  comes before the front starts piping), the first piece before and the rest one per loop
  iteration after, or all after;
- the body path: piped as it is, piped through a tap (``proxy.body.tap_body``), or iterated by the
  front (a wrapper without ``pipe``);
- the front: HTTP/1.1 (``proxy.server.h1``) or HTTP/2 (``proxy.server.h2``).

The client's view (status, headers but the request id, framing, decoded body, ended) must equal the
recording's, and the upstream connection must be back in its pool. A defect of this class made a
keep-alive HTTP/1.1 client wait 75 s for a response that had already ended (issue 12).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import httptools
import pytest

from proxy.body import tap_body
from proxy.clock import MonotonicClock
from proxy.config import Http2Config, LimitsConfig, UpstreamConfig
from proxy.http import Request, Response
from proxy.server.front import Front
from proxy.server.h1 import H1Connection as H1Front
from proxy.server.h2 import H2Connection as H2Front
from proxy.upstream.h1 import H1Connection as H1Upstream
from proxy.upstream.h2_conn import H2UpstreamConnection
from tests.fake_transport import FakeTransport

SSE_EVENTS = [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', b"data: [DONE]\n\n"]


@dataclass(frozen=True)
class Recording:
    name: str
    status: int
    headers: tuple[tuple[bytes, bytes], ...]  # what passes through to the client
    chunks: tuple[bytes, ...]  # the body as the upstream framed it (chunks or DATA frames)
    length: bool  # the upstream sent a Content-Length

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def http1(self) -> bytes:
        lines = [b"HTTP/1.1 %d OK" % self.status, *(b"%b: %b" % kv for kv in self.headers)]
        if self.length:
            lines.append(b"content-length: %d" % len(self.body))
            return b"\r\n".join(lines) + b"\r\n\r\n" + self.body
        lines.append(b"transfer-encoding: chunked")
        framed = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in self.chunks if c)
        return b"\r\n".join(lines) + b"\r\n\r\n" + framed + b"0\r\n\r\n"


SSE_HEADERS = ((b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache"))
RECORDINGS = [
    Recording("sse", 200, SSE_HEADERS, tuple(SSE_EVENTS), length=False),
    Recording("chunked", 200, ((b"content-type", b"text/plain"),), (b"hello ", b"world"), length=False),
    Recording("content-length", 200, ((b"content-type", b"application/json"),), (b'{"ok":true}',), True),
    Recording("empty-chunked", 200, ((b"content-type", b"text/plain"),), (), length=False),
    Recording("empty-length", 200, ((b"content-type", b"text/plain"),), (b"",), length=True),
]


# -- the client's view ----------------------------------------------------------------------------
@dataclass
class Seen:
    status: int = 0
    headers: list[tuple[bytes, bytes]] | None = None
    framing: str = ""  # "length" or "chunked" (HTTP/1.1); "length" or "none" (HTTP/2)
    body: bytes = b""
    ended: bool = False

    def key(self) -> tuple[Any, ...]:
        return (self.status, self.headers, self.framing, self.body, self.ended)


class H1Reader:
    """The client side of the HTTP/1.1 front: httptools parses what the front wrote."""

    def __init__(self) -> None:
        self.seen = Seen()
        self._raw: list[tuple[bytes, bytes]] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.seen.status = self.parser.get_status_code()
        names = {k for k, _ in self._raw}
        self.seen.framing = "length" if b"content-length" in names else "chunked"
        if b"transfer-encoding" not in names and b"content-length" not in names:
            self.seen.framing = "close"
        self.seen.headers = [
            kv for kv in self._raw if kv[0] not in (b"x-request-id", b"content-length", b"transfer-encoding")
        ]

    def on_body(self, chunk: bytes) -> None:
        self.seen.body += chunk

    def on_message_complete(self) -> None:
        self.seen.ended = True


class H2Reader:
    """The client side of the HTTP/2 front: an h2 client connection."""

    def __init__(self) -> None:
        self.seen = Seen()
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.h2.initiate_connection()

    def request(self) -> bytes:
        self.h2.send_headers(
            1,
            [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/v1/x")],
            end_stream=True,
        )
        return self.h2.data_to_send()

    def feed(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                raw = [(bytes(k), bytes(v)) for k, v in event.headers or ()]
                self.seen.status = int(dict(raw)[b":status"])
                self.seen.framing = "length" if any(k == b"content-length" for k, _ in raw) else "none"
                self.seen.headers = [
                    kv for kv in raw if kv[0] not in (b":status", b"x-request-id", b"content-length")
                ]
            elif isinstance(event, h2.events.DataReceived):
                self.seen.body += event.data or b""
            elif isinstance(event, h2.events.StreamEnded):
                self.seen.ended = True


def expected(rec: Recording, front: str) -> tuple[Any, ...]:
    unframed = "chunked" if front == "h1" else "none"  # HTTP/2 has no chunks: no content-length
    framing = "length" if rec.length else unframed
    return (rec.status, list(rec.headers), framing, rec.body, True)


# -- the upstream side ----------------------------------------------------------------------------
class FakeH1Pool:
    """What an upstream HTTP/1.1 connection needs of its pool."""

    def __init__(self) -> None:
        self.cfg = UpstreamConfig(url="http://up")
        self.name = "up"
        self.released = 0
        self.discarded = 0

    def release(self, conn: object) -> None:
        self.released += 1

    def discard(self, conn: object) -> None:
        self.discarded += 1


class FakeH2Pool:
    """What an upstream HTTP/2 connection needs of its pool."""

    def __init__(self) -> None:
        self.cfg = UpstreamConfig(url="http://up", protocol="h2c")
        self.name = "up"
        self.done = 0

    def stream_done(self, conn: object) -> None:
        self.done += 1

    def capacity_changed(self, conn: object) -> None:
        pass

    def went_away(self, conn: object) -> None:
        pass

    def connection_lost(self, conn: object) -> None:
        pass


REQUEST_HEADERS = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"up"), (b":path", b"/v1/x")]


@dataclass(frozen=True)
class H2Recording:
    hello: bytes  # the server's SETTINGS (and ACK): fed before the request, never split
    response: bytes  # the server's frames of the response on stream 1


def record_h2(rec: Recording) -> H2Recording:
    """Play the server against a real upstream connection once and keep what the server wrote."""

    async def play() -> H2Recording:
        loop = asyncio.get_running_loop()
        conn = H2UpstreamConnection(cast(Any, FakeH2Pool()), loop)
        transport = FakeTransport()
        conn.connection_made(cast(asyncio.Transport, transport))
        server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        server.initiate_connection()
        server.receive_data(transport.take())
        hello = server.data_to_send()
        conn.data_received(hello)
        task = asyncio.ensure_future(conn.request(REQUEST_HEADERS, b""))
        for _ in range(5):
            await asyncio.sleep(0)
        server.receive_data(transport.take())
        server.data_to_send()  # the ACK of the client's SETTINGS went out with the hello's reply
        head = [(b":status", b"%d" % rec.status), *rec.headers]
        if rec.length:
            head.append((b"content-length", b"%d" % len(rec.body)))
        server.send_headers(1, head)
        for chunk in rec.chunks:
            server.send_data(1, chunk)
        server.end_stream(1)
        response = server.data_to_send()
        conn.data_received(response)
        await task
        return H2Recording(hello, response)

    return asyncio.run(play())


H2_RECORDINGS = {rec.name: record_h2(rec) for rec in RECORDINGS}


# -- the cases ------------------------------------------------------------------------------------
def splits(data: bytes) -> Iterator[tuple[str, list[bytes]]]:
    yield "whole", [data]
    for i in range(1, len(data)):
        yield f"split@{i}", [data[:i], data[i:]]
    yield "bytewise", [data[i : i + 1] for i in range(len(data))]


TIMINGS = ("before", "first-before", "after")
WRAPPERS = ("piped", "tapped", "iterated")


class IdentityTap:
    keeps_length = True

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def end(self, exc: BaseException | None) -> bytes:
        return b""


class Iterated:
    """A middleware's wrapper that the front can only iterate (it has no ``pipe``)."""

    def __init__(self, inner: AsyncIterator[bytes]) -> None:
        self._inner = inner
        self.length: int | None = getattr(inner, "length", None)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        return await self._inner.__anext__()

    async def aclose(self) -> None:
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()


def wrap(response: Response, wrapper: str) -> Response:
    body = response.body
    if isinstance(body, bytes) or wrapper == "piped":
        return response
    if wrapper == "tapped":
        return Response(response.status, response.headers, tap_body(body, IdentityTap()))
    return Response(response.status, response.headers, Iterated(body))


def deliver(
    loop: asyncio.AbstractEventLoop, feed: Callable[[bytes], None], pieces: list[bytes], timing: str
) -> None:
    """Feed ``pieces`` now ("before"), the first now and the rest one per loop iteration
    ("first-before"), or all one per iteration from the next on ("after")."""
    later = list(pieces)
    if timing == "before":
        for piece in later:
            feed(piece)
        return
    if timing == "first-before":
        feed(later.pop(0))

    def step() -> None:
        if later:
            feed(later.pop(0))
            loop.call_soon(step)

    loop.call_soon(step)


Upstream = Callable[[list[bytes], str], Awaitable[Response]]


async def run_case(
    rec: Recording, up: str, front: str, pieces: list[bytes], timing: str, wrapper: str
) -> str:
    """One exchange; returns what went wrong ('' when nothing did)."""
    loop = asyncio.get_running_loop()
    pool_check: Callable[[], str]

    if up == "h1":
        h1_pool = FakeH1Pool()
        h1_conn = H1Upstream(cast(Any, h1_pool), loop)
        h1_conn.connection_made(cast(asyncio.Transport, FakeTransport()))

        async def exchange() -> Response:
            waiter = h1_conn.start(b"POST /v1/x HTTP/1.1\r\ncontent-length: 0\r\n\r\n", False, loop.time())
            deliver(loop, h1_conn.data_received, pieces, timing)
            return await waiter

        def pool_check() -> str:
            ok = h1_pool.released == 1 and not h1_pool.discarded and not h1_conn.closed
            return "" if ok else f"upstream connection not back in its pool ({vars(h1_pool)})"

    else:
        h2_pool = FakeH2Pool()
        h2_conn = H2UpstreamConnection(cast(Any, h2_pool), loop)
        h2_conn.connection_made(cast(asyncio.Transport, FakeTransport()))
        h2_conn.data_received(H2_RECORDINGS[rec.name].hello)

        async def exchange() -> Response:
            task = asyncio.ensure_future(h2_conn.request(REQUEST_HEADERS, b""))
            await asyncio.sleep(0)  # the stream is open; request() awaits its head
            deliver(loop, h2_conn.data_received, pieces, timing)
            status, headers, body = await task
            return Response(status, headers, body)

        def pool_check() -> str:
            ok = h2_pool.done == 1 and not h2_conn.streams and not h2_conn.closed
            return "" if ok else f"upstream stream not done (done={h2_pool.done}, streams={h2_conn.streams})"

    async def handler(request: Request) -> Response:
        return wrap(await exchange(), wrapper)

    transport = FakeTransport()
    fronts = Front(handler, LimitsConfig(), MonotonicClock(), loop, 10)
    reader: H1Reader | H2Reader
    if front == "h1":
        h1_reader = reader = H1Reader()
        client: asyncio.Protocol = H1Front(fronts)
        client.connection_made(cast(asyncio.Transport, transport))
        client.data_received(b"POST /v1/x HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")

        def take() -> None:
            h1_reader.parser.feed_data(transport.take())

    else:
        h2_reader = reader = H2Reader()
        client = H2Front(fronts, Http2Config())
        client.connection_made(cast(asyncio.Transport, transport))
        client.data_received(h2_reader.request())

        def take() -> None:
            h2_reader.feed(transport.take())

    for _ in range(2 * len(pieces) + 50):  # no I/O: every step is a loop iteration
        await asyncio.sleep(0)
        take()
        if reader.seen.ended and not pool_check() and not fronts.driver.current.in_flight:
            break
    if transport.closed:
        return "the front closed the client connection"
    if reader.seen.key() != expected(rec, front):
        return f"client saw {reader.seen.key()!r}, expected {expected(rec, front)!r}"
    if fronts.driver.current.in_flight:  # every response that ended was counted as done
        return f"{fronts.driver.current.in_flight} request(s) still counted in flight"
    return pool_check()


@pytest.mark.parametrize("front", ["h1", "h2"])
@pytest.mark.parametrize("up", ["h1", "h2"])
@pytest.mark.parametrize("rec", RECORDINGS, ids=[r.name for r in RECORDINGS])
async def test_every_split_gives_the_client_the_same_complete_response(
    rec: Recording, up: str, front: str
) -> None:
    data = rec.http1() if up == "h1" else H2_RECORDINGS[rec.name].response
    failures: list[str] = []
    cases = 0
    for split, pieces in splits(data):
        for timing in TIMINGS:
            for wrapper in WRAPPERS:
                cases += 1
                problem = await run_case(rec, up, front, pieces, timing, wrapper)
                if problem:
                    failures.append(f"{split} {timing} {wrapper}: {problem}")
    assert not failures, f"{len(failures)} of {cases} cases failed; first ones:\n" + "\n".join(failures[:8])


async def test_a_chunked_response_that_arrived_whole_leaves_the_http1_front_in_one_write() -> None:
    loop = asyncio.get_running_loop()
    rec = RECORDINGS[0]
    pool = FakeH1Pool()
    upstream = H1Upstream(cast(Any, pool), loop)
    upstream.connection_made(cast(asyncio.Transport, FakeTransport()))

    async def handler(request: Request) -> Response:
        waiter = upstream.start(b"POST /v1/x HTTP/1.1\r\ncontent-length: 0\r\n\r\n", False, loop.time())
        upstream.data_received(rec.http1())
        return await waiter

    transport = FakeTransport()
    conn = H1Front(Front(handler, LimitsConfig(), MonotonicClock(), loop, 10))
    conn.connection_made(cast(asyncio.Transport, transport))
    conn.data_received(b"POST /v1/x HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}")
    for _ in range(10):
        await asyncio.sleep(0)
    reader = H1Reader()
    reader.parser.feed_data(bytes(transport.written))
    assert reader.seen.key() == expected(rec, "h1")
    assert transport.writes == 1
