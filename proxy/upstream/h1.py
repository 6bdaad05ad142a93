"""One pooled HTTP/1.1 connection to an upstream, parsed with httptools (llhttp).

An exchange: ``start(data)`` writes the whole request in one call and gives the future of the
response head, which the pool awaits (``H1Pool.send``; a future, not a coroutine: one frame
less). If the whole response arrived with the head and was not chunked (the usual non-streaming
case: Content-Length), the body comes back as ``bytes`` and the connection is already back in the
pool; otherwise an :class:`UpstreamBody` streams the rest, by callbacks into the front (``pipe``) or
as an async iterator. A chunked response stays a stream even when it arrived whole, so the client's
framing never depends on how the reads fell.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

import httptools

from proxy.errors import UpstreamClosed, UpstreamProtocolError, UpstreamTimeout
from proxy.http import BodySink, Headers, Response
from proxy.upstream.base import RESPONSE_DROP

INF = float("inf")

if TYPE_CHECKING:
    from proxy.upstream.pool import H1Pool

# Iterator mode: stop reading the upstream above this many buffered bytes, resume below LOW.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class UpstreamBody:
    """The rest of a streamed upstream response. Either piped (callbacks) or iterated, not both."""

    __slots__ = ("_buf", "_buffered", "_conn", "_done", "_exc", "_paused", "_sink", "_waiter", "length")

    def __init__(self, conn: H1Connection, first: list[bytes], length: int | None) -> None:
        self._conn = conn
        self._buf: deque[bytes] = deque(first)
        self._buffered = sum(len(c) for c in first)
        self._sink: BodySink | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._exc: BaseException | None = None
        self._paused = False
        self.length = length  # Content-Length of the upstream response, None when chunked

    # -- fed by the connection -------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        sink = self._sink
        if sink is not None:
            sink.write(chunk)
            return
        self._buf.append(chunk)
        self._buffered += len(chunk)
        self._wake()
        if self._buffered > HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.pause_reading()

    def end(self, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        self._exc = exc
        sink = self._sink
        if sink is not None:
            if exc is None:
                sink.finish()
            else:
                sink.fail(exc)
        else:
            self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    # -- PipeableBody ----------------------------------------------------------------------------
    def pipe(self, sink: BodySink) -> None:
        self._sink = sink
        while self._buf:
            sink.write(self._buf.popleft())
        self._buffered = 0
        if self._done:
            if self._exc is None:
                sink.finish()
            else:
                sink.fail(self._exc)
        elif self._paused:
            self._paused = False
            self._conn.resume_reading()

    def pause_producing(self) -> None:
        if not self._done:
            self._conn.pause_reading()

    def resume_producing(self) -> None:
        if not self._done:
            self._conn.resume_reading()

    def abort(self) -> None:
        """The client went away: close the upstream connection so the backend stops generating."""
        if not self._done:
            self._done = True
            self._exc = asyncio.CancelledError()
            self._conn.abort()

    # -- async iterator --------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while not self._buf:
            if self._done:
                if self._exc is not None:
                    raise self._exc
                raise StopAsyncIteration
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            except asyncio.CancelledError:
                self.abort()
                raise
            finally:
                self._waiter = None
        chunk = self._buf.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < LOW_WATER:
            self._paused = False
            self._conn.resume_reading()
        return chunk

    async def aclose(self) -> None:
        self.abort()


class H1Connection(asyncio.Protocol):
    """An asyncio protocol for one upstream connection; at most one exchange at a time."""

    def __init__(self, pool: H1Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.reused = False  # served an exchange before: a failure may be a stale keep-alive
        self.idle_since = 0.0
        self._reading_paused = False
        self._waiter: asyncio.Future[Response] | None = None
        # One timer per connection, armed lazily: it watches ``_head_deadline`` while a response
        # head is awaited and the read-idle gap while a body streams. Moving the deadline is a
        # float store, so a non-streaming exchange arms no timer in the steady state.
        self._timer: asyncio.TimerHandle | None = None
        self._head_deadline = INF
        self._total_deadline = INF  # the exchange must be complete by then (total_timeout_s)
        self._head_only = False
        self._batch: list[bytes] = []  # streamed body chunks parsed from the current read
        # The exchange in progress, reset by start():
        self._headers = Headers()  # the response headers that pass through to the client
        self._dropped: list[tuple[bytes, bytes]] | None = None  # hop-by-hop ones but Content-Length
        self._status = 0
        self._head_done = False
        self._complete = False
        self._early: list[bytes] = []  # body bytes that came with the head
        self._body: UpstreamBody | None = None
        self._got_bytes = False
        self._active = False  # any bytes since the read-timeout timer last looked
        self._keep_alive = True
        self._length: int | None = None
        self._until_eof = False  # the body has neither a length nor chunks: the close ends it
        self._chunked = False  # Transfer-Encoding: chunked

    # -- exchange ----------------------------------------------------------------------------------
    def start(self, data: bytes, head_only: bool, now: float) -> asyncio.Future[Response]:
        """Send a request (all of it in ``data``) at loop time ``now``; the future gives the
        response once its head is in. Whoever awaits it calls :meth:`cancel` if it is cancelled."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise UpstreamClosed("upstream connection closed", sent_nothing_new=True)
        # (_status, _keep_alive, _until_eof: set with the head; _body, _active: with a stream, and
        # None again once it ends; a connection whose exchange failed is never reused.)
        self._headers = Headers()
        self._dropped = None
        self._head_done = False
        self._complete = False
        self._early = []
        self._got_bytes = False
        self._length = None
        self._head_only = head_only
        waiter: asyncio.Future[Response] = self.loop.create_future()
        self._waiter = waiter
        transport.write(data)
        cfg = self.pool.cfg
        self._total_deadline = total = now + cfg.total_timeout_s
        deadline = now + cfg.first_byte_timeout_s
        if deadline > total:
            deadline = total
        self._head_deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:  # (one left from a stream may fire too late)
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
        return waiter

    def cancel(self, waiter: asyncio.Future[Response]) -> None:
        """The client left before the head came: stop the backend's work. (By then the connection
        may already serve another exchange: only touch it if not.)"""
        if self._waiter is waiter:
            self.abort()

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        deadline = self._head_deadline
        if deadline != INF:  # awaiting a response head
            if self.loop.time() < deadline:
                self._timer = self.loop.call_at(deadline, self._on_timer)
            else:
                self._fail(UpstreamTimeout(f"upstream {self.pool.name!r} sent no response in time"))
        elif self._body is not None:  # streaming a body: was anything read since the last look?
            now = self.loop.time()
            if now >= self._total_deadline:
                self._fail(
                    UpstreamTimeout(f"upstream {self.pool.name!r} did not finish within total_timeout_s")
                )
            elif self._active or self._reading_paused:  # (paused: the client is slow, not the upstream)
                self._active = False
                gap_end = now + self.pool.cfg.read_timeout_s
                self._timer = self.loop.call_at(min(gap_end, self._total_deadline), self._on_timer)
            else:
                self._fail(UpstreamTimeout(f"upstream {self.pool.name!r} stalled mid-response"))
        # else: idle in the pool, nothing to watch; the next exchange arms a timer again

    def _resolve_head(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        self._waiter = None
        self._head_deadline = INF
        headers = self._headers
        if self._complete and (not self._chunked or self._head_only):
            early = self._early
            body = early[0] if len(early) == 1 else b"".join(early)
            waiter.set_result(Response(self._status, headers, body))
            self._finish_exchange()
            return
        stream = UpstreamBody(self, self._early, self._length)
        self._early = []
        if self._complete:
            # A chunked response whose end came with its head stays a stream: the client sees the
            # framing the upstream chose, whatever the reads were, never Content-Length this time
            # and chunked the next.
            self._finish_exchange()
            stream.end(None)
            waiter.set_result(Response(self._status, headers, stream))
            return
        self._body = stream
        # As if read just now: a timer armed earlier (the head's) may fire before read_timeout_s
        # has passed, and must then only look again, not cut the stream.
        self._active = True
        read_deadline = min(self.loop.time() + self.pool.cfg.read_timeout_s, self._total_deadline)
        timer = self._timer
        if timer is None or timer.when() > read_deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(read_deadline, self._on_timer)
        waiter.set_result(Response(self._status, headers, stream))

    def _finish_exchange(self) -> None:
        """The response is complete: back to the pool (its timer, if armed, fires once idle and
        stops), or closed."""
        if self._keep_alive and not self._head_only and not self.closed:
            self.reused = True
            # A front may have paused reading in the middle of the read that held the end of the
            # body (a slow client): the body is done, so that pause would never be lifted.
            if self._reading_paused:
                self.resume_reading()
            self.pool.release(self)
        else:
            self.abort()

    def _fail(self, exc: BaseException) -> None:
        waiter = self._waiter
        self._waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        elif self._body is not None:
            self._body.end(exc)
        self.abort()

    # -- flow control ------------------------------------------------------------------------------
    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()
            self.pool.discard(self)

    # -- asyncio.Protocol --------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they are transports.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        self._active = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._batch.clear()
            self._fail(UpstreamProtocolError(f"upstream {self.pool.name!r} sent a malformed response: {e}"))
            return
        if self._batch:
            self._flush_batch()
        if self._head_done and self._waiter is not None:
            self._resolve_head()

    def _flush_batch(self) -> None:
        """Hand the body chunks parsed from one read to the body as one chunk: one write to the
        client per upstream read, however many SSE events (HTTP chunks) the read held."""
        batch = self._batch
        body = self._body
        if body is not None:
            body.feed(batch[0] if len(batch) == 1 else b"".join(batch))
        batch.clear()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        body = self._body
        waiter = self._waiter
        self._waiter = None
        if body is not None and not self._complete:
            self._body = None
            if self._until_eof and exc is None:
                self._complete = True  # a close-delimited body ends with the connection
                body.end(None)
            else:
                body.end(UpstreamClosed(f"upstream {self.pool.name!r} closed the connection mid-response"))
        elif waiter is not None and not waiter.done():
            stale = self.reused and not self._got_bytes
            waiter.set_exception(
                UpstreamClosed(
                    f"upstream {self.pool.name!r} closed the connection before responding",
                    sent_nothing_new=stale,
                )
            )
        if not self.closed:
            self.closed = True
            self.pool.discard(self)

    # -- httptools callbacks -----------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name not in RESPONSE_DROP:
            self._headers.append((name, value))
        elif name == b"content-length":
            self._length = int(value)
        elif self._dropped is None:
            self._dropped = [(name, value)]
        else:
            self._dropped.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # an interim response (100 Continue): the real head follows
            self._headers = Headers()
            self._dropped = None
            self._length = None
            return
        self._status = status
        self._keep_alive = self.parser.should_keep_alive()
        chunked = False
        for k, v in self._dropped or ():
            if k == b"transfer-encoding":
                chunked = v.rstrip().lower().endswith(b"chunked")
            elif k == b"connection":  # the names it lists are hop-by-hop too
                tokens = {t.strip().lower() for t in v.split(b",") if t.strip()}
                if tokens:
                    self._headers = Headers([kv for kv in self._headers if kv[0] not in tokens])
        self._chunked = chunked
        self._until_eof = self._length is None and not chunked
        self._head_done = True
        if self._head_only:
            self._complete = True
            self._keep_alive = False

    def on_body(self, chunk: bytes) -> None:
        if self._body is not None:
            self._batch.append(chunk)  # data_received flushes it once the read is parsed
        else:
            self._early.append(chunk)

    def on_message_complete(self) -> None:
        if not self._head_done:
            return
        self._complete = True
        body = self._body
        if body is not None:
            if self._batch:
                self._flush_batch()
            self._body = None
            self._finish_exchange()
            body.end(None)
