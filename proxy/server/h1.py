"""The HTTP/1.1 front: an asyncio.Protocol on httptools (llhttp).

A callback per parsed message; one task per connection (``_serve``, made at its first request)
runs the chain for each request in turn, woken by a future (no task per request: making one costs
more than much of the rest of the front's work); the response head and a bytes body go out in one
write; a streamed upstream body is piped into the transport by callbacks (``BodySink``), with
pause/resume reading for backpressure both ways. (So the requests of one connection share one task
and its contextvars context: a middleware that sets a ContextVar should reset it.)

Requests are answered in order (pipelining): parsed requests wait in ``_queue`` (at most
``limits.max_pipelined``, then reading pauses). Timeouts use one timer per connection that
looks at ``_deadline``; moving a deadline is a float store, so the hot path arms no timers.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

import httptools
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from proxy.body import aclose_body, discard_body, is_event_stream
from proxy.errors import (
    HeadersTooLarge,
    MalformedHttp,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    internal_error,
    sse_error_event,
)
from proxy.http import Headers, PipeableBody, Request, Response
from proxy.server.driver import RequestDriver, error_response
from proxy.server.front import status_line

if TYPE_CHECKING:
    from proxy.server.front import Front

log = logging.getLogger("llm_sidecar.front")

INF = float("inf")
# Connection phases, for the timeout that applies.
IDLE, HEADERS, BODY, BUSY, LINGER = 0, 1, 2, 3, 4
# After answering a rejected request (400/408/413/431), read and drop what the client still sends
# for this long before closing: closing with unread data makes the kernel send a reset, which can
# destroy the error response before the client reads it (nginx's lingering close).
LINGER_S = 2.0
H2_PREFACE = b"PRI * HTTP/2.0"
H2_CLIENT_PREFACE = H2_PREFACE + b"\r\n\r\nSM\r\n\r\n"  # HTTP/2 with prior knowledge starts so

_Item = tuple[Request, bool, bool]  # (request, keep_alive, http11)
# Request headers the front itself looks at, found in one pass over the head.
_WATCHED: frozenset[bytes] = frozenset(
    {
        b"transfer-encoding",
        b"content-length",
        b"expect",
        b"x-request-id",
        b"upgrade",
        b"connection",
        b"proxy-connection",
    }
)


class _Closed(Exception):
    pass


class H1Connection(asyncio.Protocol):
    def __init__(self, front: Front) -> None:
        self.front = front
        self.driver: RequestDriver = front.driver
        self.loop = front.loop
        self.limits = front.limits
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.parser = httptools.HttpRequestParser(self)
        self.closed = False
        self._queue: deque[_Item | Response] = deque()
        self._busy = False  # a response is being produced or written
        self._reading_paused = False
        self._stop_parsing = False
        self._close_after = False  # graceful shutdown asked us to close when idle
        self._task: asyncio.Task[None] | None = None  # _serve, from the first request on
        self._job: Request | None = None  # the request for _serve to answer next
        self._current: Request | None = None  # the request _serve is answering
        self._streaming: Request | None = None  # the request whose body is being written
        self._job_http11 = True  # whether its client speaks HTTP/1.1
        self._wake: asyncio.Future[None] | None = None  # _serve waits on it for the next job
        self._producer: PipeableBody | None = None  # the body being piped to us
        # While a piped body replays what it holds (inside pipe()), writes gather here and leave
        # in one: a response that arrived whole is one write, head included.
        self._cork: list[bytes] | None = None
        self._chunked = False  # current streamed response uses chunked framing
        self._sse = False  # current streamed response is SSE without Content-Length (see fail)
        self._keep_alive = True  # of the response being written
        self._write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._phase = IDLE
        self._deadline = INF
        self._deadline_phase = IDLE  # the phase the current deadline was set for
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = INF  # when _timer fires
        self._upgrade_head: bytes | None = None  # an Upgrade request's head, to parse its body again
        self._sniff: bytes | None = b""  # the first bytes, while they may be the HTTP/2 preface
        self._read_len = 0  # bytes of the read being parsed
        self._max_header_bytes = self.limits.max_header_bytes
        self._max_body_bytes = self.limits.max_body_bytes
        self._keepalive_s = self.limits.keepalive_timeout_s
        self.on_message_begin()
        self._phase = IDLE

    # The message being parsed, reset by on_message_begin.
    _url: bytes
    _headers: Headers
    _request_id: bytes | None  # the client's x-request-id
    _upgrade: bool  # an Upgrade header came
    _connection: bool  # a Connection (or Proxy-Connection) header came
    _head_reads: int  # bytes of the reads that continued an unfinished head
    _body: list[bytes]
    _chunked_body: bool  # Transfer-Encoding: chunked, so on_body counts against the limit
    _body_room: int  # bytes the body may still take

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but they are transports.
        self.transport = t = cast(asyncio.Transport, transport)
        peer = self.front.admit(self, t)
        if peer is None:
            self.closed = True
            return
        self.peer = peer
        self._set_deadline(self.limits.keepalive_timeout_s, IDLE)

    def data_received(self, data: bytes) -> None:
        if self._sniff is not None:  # the connection's first bytes: HTTP/2 with prior knowledge?
            data = self._sniff + data
            self._sniff = None
            if H2_CLIENT_PREFACE.startswith(data[:24]):
                if len(data) < 24:
                    self._sniff = data  # a prefix of the preface: wait for the rest
                    return
                if self._switch_to_h2(data):
                    return
            elif data.startswith(H2_PREFACE) and self.front.h2_factory is not None:
                self._bad_h2_preface()
                return
        if self._stop_parsing:
            return
        self._read_len = len(data)
        if self._phase == HEADERS:
            # httptools holds a header line until it ends (on_header sees nothing before): bound an
            # unfinished head here, by the bytes that keep coming for it.
            self._head_reads += len(data)
            if self._head_reads > self._max_header_bytes:
                self._reject(self._headers_too_large())
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            # We do not switch protocols: the request is served as plain HTTP/1.1 (RFC 9110
            # §7.8 lets a server ignore Upgrade). Keep parsing what followed with a new parser;
            # httptools skipped the body of an Upgrade request, so such a one is parsed again,
            # without its Upgrade header, body included.
            self.parser = httptools.HttpRequestParser(self)
            rest = data[int(e.args[0]) :] if e.args and isinstance(e.args[0], int) else b""
            if self._upgrade_head is not None:
                rest = self._upgrade_head + rest
                self._upgrade_head = None
            if rest:
                self.data_received(rest)
            return
        except httptools.HttpParserCallbackError as e:
            ctx = e.__context__
            if isinstance(ctx, ProxyError):
                self._reject(ctx)
            else:
                log.exception("bug while parsing a request from %s", self.peer)
                self._reject(internal_error())
            return
        except httptools.HttpParserError as e:
            if data.startswith(H2_PREFACE):
                self._reject(MalformedHttp("HTTP/2 is not enabled on this listener"))
            else:
                self._reject(MalformedHttp(f"malformed HTTP request: {e}"))
            return
        phase = self._phase
        if (phase in (HEADERS, BODY)) and self._deadline_phase != phase:
            # A request is half-received: give it the header/body timeout (only armed when a
            # request spans reads, so whole-packet requests never touch the timer).
            limits = self.limits
            self._set_deadline(limits.header_timeout_s if phase == HEADERS else limits.body_timeout_s, phase)

    def eof_received(self) -> bool | None:
        # Like nginx: a client that half-closes while we answer has given up on the answer.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.front.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = INF
        producer = self._producer
        if producer is not None:
            self._producer = None
            producer.abort()
        driver = self.driver
        for request in (self._current, self._streaming, self._job):
            if request is not None:
                request.ctx.disconnected = True
                driver.done(request)
        self._streaming = None
        task = self._task
        if task is not None and not task.done():
            task.cancel()
        self._job = None
        for item in self._queue:
            if isinstance(item, tuple):
                item[0].ctx.disconnected = True
                driver.done(item[0])
        self._queue.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(_Closed())

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._producer is not None:
            self._producer.pause_producing()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._producer is not None:
            self._producer.resume_producing()
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks ---------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._phase = HEADERS
        self._url = b""
        self._headers = Headers()
        self._request_id = None
        self._upgrade = False
        self._connection = False
        self._head_reads = 0
        self._body = []
        self._chunked_body = False

    # The head's size (URL, and name + value + 4 per header) is not counted as it comes: a head
    # that fits in one read no larger than max_header_bytes cannot exceed it; any other is counted
    # once complete (on_headers_complete), and one still incomplete is bounded by the bytes read
    # for it (data_received).
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._phase = BODY
        if self._head_reads or self._read_len > self._max_header_bytes:  # see on_url
            size = len(self._url)
            for name, value in self._headers:
                size += len(name) + len(value) + 4
            if size > self._max_header_bytes:
                raise self._headers_too_large()
        expect = False
        for name, value in self._headers:  # one pass: the names the front acts on
            if name not in _WATCHED:
                continue
            if name == b"content-length":
                if int(value) > self._max_body_bytes:
                    raise self._too_large()
            elif name == b"x-request-id":
                if self._request_id is None:
                    self._request_id = value
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked":
                    raise MalformedHttp("only 'Transfer-Encoding: chunked' is supported in requests")
                self._chunked_body = True
                self._body_room = self._max_body_bytes
            elif name == b"upgrade":
                self._upgrade = True
            elif name == b"connection" or name == b"proxy-connection":
                self._connection = True
            elif name == b"expect":
                if value.lower() != b"100-continue":
                    raise MalformedHttp("unsupported Expect header")
                expect = True
        if expect and not self._busy and not self._queue and self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk: bytes) -> None:
        if self._chunked_body:  # else Content-Length framed it, checked in on_headers_complete
            room = self._body_room - len(chunk)
            if room < 0:
                raise self._too_large()
            self._body_room = room
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        parser = self.parser
        headers = self._headers
        if self._upgrade and parser.should_upgrade() and self._declares_body():
            self._upgrade_head = self._head_without_upgrade()  # data_received parses it again
            return
        body = self._body
        request = self.driver.request(
            parser.get_method().decode(),
            self._url,
            headers,
            body[0] if len(body) == 1 else b"".join(body),
            self.peer,
            self._request_id,
        )
        keep_alive = parser.should_keep_alive()
        # HTTP/1.0 keeps a connection alive only when a Connection header asks to: without one, a
        # keep-alive request is HTTP/1.1 (get_http_version formats a string: a dear call).
        http11 = (keep_alive and not self._connection) or parser.get_http_version() == "1.1"
        self._phase = BUSY
        self._deadline = INF
        self._deadline_phase = BUSY
        if self._busy:
            self._queue.append((request, keep_alive, http11))
            if len(self._queue) >= self.limits.max_pipelined and not self._reading_paused:
                self._reading_paused = True
                if self.transport is not None:
                    self.transport.pause_reading()
        else:
            self._answer(request, keep_alive, http11)

    def _declares_body(self) -> bool:
        headers = self._headers
        return headers.get(b"content-length", b"0") != b"0" or headers.get(b"transfer-encoding") is not None

    def _head_without_upgrade(self) -> bytes:
        parser = self.parser
        version = parser.get_http_version().encode()
        parts = [b"%b %b HTTP/%b\r\n" % (parser.get_method(), self._url, version)]
        parts.extend(b"%b: %b\r\n" % kv for kv in self._headers if kv[0] != b"upgrade")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _headers_too_large(self) -> HeadersTooLarge:
        return self.driver.headers_too_large()

    def _too_large(self) -> PayloadTooLarge:
        return self.driver.too_large()

    # -- answering -------------------------------------------------------------------------------
    def _dispatch(self, item: _Item | Response) -> None:
        if isinstance(item, Response):  # an early error's answer (_reject)
            self._busy = True
            self._keep_alive = False
            assert isinstance(item.body, bytes)
            self._write_whole(item, item.body, None, http11=True)
        else:
            self._answer(*item)

    def _answer(self, request: Request, keep_alive: bool, http11: bool) -> None:
        self._busy = True
        self._keep_alive = keep_alive and not self._close_after
        local = self.driver.local_answer(request)
        if local is not None:
            assert isinstance(local.body, bytes)
            self._write_whole(local, local.body, request, http11)
            return
        self._job = request
        self._job_http11 = http11
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set_result(None)
        elif self._task is None or self._task.done():
            self._task = self.loop.create_task(self._serve())
        # else _serve is running (this call came from it, through _response_done): it takes the job next

    async def _serve(self) -> None:
        """The connection's task: for each job in turn, run the chain and start the response.

        Ends with the connection (connection_lost cancels it)."""
        loop = self.loop
        while not self.closed:
            request = self._job
            if request is None:
                self._wake = wake = loop.create_future()
                try:
                    await wake
                except asyncio.CancelledError:
                    return
                continue
            self._job = None
            self._current = request
            try:
                # One request in a frame of its own: its response is not held while the
                # connection waits for the next.
                await self._respond(request, self._job_http11)
            except asyncio.CancelledError:
                return  # the client went away; connection_lost has cleaned up
            except Exception:
                log.exception("failed to answer %s %s; closing the connection", request.method, request.path)
                self.driver.done(request)
                self.abort()
                return
            finally:
                self._current = None

    async def _respond(self, request: Request, http11: bool) -> None:
        driver = self.driver
        try:  # (driver.respond, inlined)
            response = await driver.chain(request)(request)
        except BaseException as e:
            response = driver.failed(request, e)
        else:
            driver.answered(request, response)
        if self.closed:
            discard_body(response)
            self.driver.done(request)
            return
        body = response.body
        if isinstance(body, bytes):
            self._write_whole(response, body, request, http11)
            return
        self._streaming = request
        if hasattr(body, "pipe"):  # a PipeableBody: an UpstreamBody, or a middleware's wrapper of one
            pipeable = cast(PipeableBody, body)
            self._cork = []
            self._write_head(response, request, getattr(body, "length", None), http11)
            self._producer = pipeable
            pipeable.pipe(self)  # finish() / fail() complete the response, from upstream callbacks
            self._uncork()
            if self._write_paused:  # the client is still behind on an earlier response
                pipeable.pause_producing()
        else:
            self._write_head(response, request, getattr(body, "length", None), http11)
            await self._write_iter(body)

    def _write_whole(self, response: Response, body: bytes, request: Request | None, http11: bool) -> None:
        """A response whose body is ``body`` (its bytes): head and body in one write."""
        head = self._head(response, request, b"content-length: %d" % len(body), http11)
        transport = self.transport
        if transport is not None:
            if request is not None and request.method == "HEAD":
                transport.write(head)
            else:
                transport.write(head + body)
        if request is not None:
            self.driver.done(request)
        self._response_done()

    def _write_head(self, response: Response, request: Request, length: int | None, http11: bool) -> None:
        self._sse = length is None and is_event_stream(response)
        if length is not None:
            framing = b"content-length: %d" % length
            self._chunked = False
        elif http11:
            framing = b"transfer-encoding: chunked"
            self._chunked = True
        else:  # an HTTP/1.0 client: the body ends when the connection does
            framing = b""
            self._chunked = False
            self._keep_alive = False
        self._send(self._head(response, request, framing, http11))

    def _head(self, response: Response, request: Request | None, framing: bytes, http11: bool) -> bytes:
        """The status line and header lines; ``framing`` is one header line without its CRLF, or b""."""
        status = response.status
        lines = [status_line(status)]
        for kv in response.headers:
            lines.append(b": ".join(kv))
        if request is not None:
            lines.append(b"x-request-id: " + request.ctx.request_id)
        if framing:
            lines.append(framing)
        if not self._keep_alive:
            lines.append(b"connection: close")
        elif not http11:
            lines.append(b"connection: keep-alive")
        lines.append(b"\r\n")  # joined: the last line's CRLF, then the empty line
        return b"\r\n".join(lines)

    async def _write_iter(self, body: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in body:
                if chunk:
                    self.write(chunk)
                if self._write_paused and not self.closed:
                    self._drain = self.loop.create_future()
                    await self._drain
        except (asyncio.CancelledError, _Closed):
            await aclose_body(body)
            return
        except Exception as e:
            await aclose_body(body)
            self.fail(e)
            return
        self.finish()

    # -- BodySink (a piped or iterated streamed body) ----------------------------------------------
    def write(self, data: bytes) -> None:
        if self.transport is None or self.closed:
            return
        self._send(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)

    def finish(self) -> None:
        self._producer = None
        if self._chunked and self.transport is not None and not self.closed:
            self._send(b"0\r\n\r\n")
        self._stream_done()
        self._response_done()

    def _stream_done(self) -> None:
        request = self._streaming
        if request is not None:
            self._streaming = None
            self.driver.done(request)

    def _send(self, data: bytes) -> None:
        cork = self._cork
        if cork is not None:
            cork.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def _uncork(self) -> None:
        cork = self._cork
        if cork is None:
            return
        self._cork = None
        if cork and self.transport is not None and not self.closed:
            self.transport.write(cork[0] if len(cork) == 1 else b"".join(cork))

    def fail(self, exc: BaseException) -> None:
        """The upstream failed mid-body: the client must not mistake the cut for the end, so the
        connection closes without the final chunk (or short of Content-Length) — except for SSE."""
        self._producer = None
        if not isinstance(exc, ProxyError | asyncio.CancelledError):
            log.error("stream to %s failed: %r", self.peer, exc)
        self._stream_done()
        self._keep_alive = False
        transport = self.transport
        if self._sse and not self.closed and transport and not isinstance(exc, asyncio.CancelledError):
            # An SSE stream ends with an OpenAI-shaped error event (the openai SDK raises it), then
            # the end of the body, then the connection closes: never a cut that looks like the end.
            event = sse_error_event(exc)
            self._send(b"%x\r\n%b\r\n0\r\n\r\n" % (len(event), event) if self._chunked else event)
            self._response_done()
            return
        self._busy = False
        self._cork = None
        self.abort()

    # -- connection management -------------------------------------------------------------------
    def _response_done(self) -> None:
        self._uncork()
        self._busy = False
        if not self._keep_alive:
            if self._stop_parsing:
                self._linger()
            else:
                self._close()
            return
        if self._queue:
            self._dispatch(self._queue.popleft())
            if self._reading_paused and len(self._queue) < self.limits.max_pipelined:
                self._reading_paused = False
                if self.transport is not None:
                    self.transport.resume_reading()
            return
        if self._close_after:
            self._close()
            return
        if self._phase == BUSY:  # the keep-alive timeout from now (_set_deadline, inlined)
            self._phase = IDLE
            self._deadline = deadline = self.loop.time() + self._keepalive_s
            self._deadline_phase = IDLE
            if self._timer_at > deadline:
                self._set_deadline(self._keepalive_s, IDLE)

    def _reject(self, err: ProxyError) -> None:
        """Malformed or over-limit input: answer (after what is in flight) and close."""
        answer = self.driver.early_error(err, self._request_id)
        self._stop_parsing = True
        self._phase = BUSY
        self._deadline = INF
        self._deadline_phase = BUSY
        if self.transport is not None:
            self.transport.pause_reading()
        if self._busy:
            self._queue.append(answer)
        else:
            self._dispatch(answer)

    def _linger(self) -> None:
        """Half-close after the error response; drop input until EOF or LINGER_S, then close."""
        t = self.transport
        if t is None or self.closed:
            return
        if not t.can_write_eof():
            t.close()
            return
        t.write_eof()  # sent once the error response is flushed
        self._phase = LINGER
        self._set_deadline(LINGER_S, LINGER)
        t.resume_reading()  # data_received discards it (_stop_parsing); eof_received closes

    def _switch_to_h2(self, data: bytes) -> bool:
        """Hand the connection to the HTTP/2 front (False when HTTP/2 is off: then it is rejected)."""
        transport = self.transport
        if transport is None or self.front.h2_factory is None:
            return False
        self.closed = True
        self.front.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = INF
        return self.front.switch_to_h2(transport, data)

    def _bad_h2_preface(self) -> None:
        """An HTTP/2 client whose preface is wrong: answered as HTTP/2 answers it (RFC 9113
        §3.4: a connection error, GOAWAY PROTOCOL_ERROR), not with an HTTP/1.1 400."""
        log.info("HTTP/2 client %s sent an invalid connection preface; closing", self.peer)
        self._stop_parsing = True
        transport = self.transport
        if transport is not None and not self.closed:
            goaway = GoAwayFrame(0, last_stream_id=0, error_code=ErrorCodes.PROTOCOL_ERROR)
            transport.write(goaway.serialize())
            transport.close()

    def cut(self, err: ProxyError) -> int:
        """The drain ran out (see ClientConnection.cut)."""
        if self.closed or self.transport is None:
            return 0
        task = self._task
        if self._streaming is not None:  # a streamed answer under way: it ends as broken streams do
            producer, self._producer = self._producer, None
            if producer is not None:
                producer.abort()
            self.fail(err)
        elif self._current is not None:  # still in the chain: answered with the error
            request = self._current
            request.ctx.disconnected = True  # (the driver lets the cancellation through)
            if task is not None and not task.done():
                task.cancel()
            self._keep_alive = False
            answer = error_response(err)
            assert isinstance(answer.body, bytes)
            self._write_whole(answer, answer.body, request, self._job_http11)
        else:
            self._close()
            return 0
        if task is not None and not task.done():
            task.cancel()
        self._close()
        return 1

    def close_when_idle(self) -> None:
        self._close_after = True
        if not self._busy and not self._queue:
            self._close()

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- timeouts --------------------------------------------------------------------------------
    def _set_deadline(self, seconds: float, phase: int) -> None:
        deadline = self.loop.time() + seconds
        self._deadline = deadline
        self._deadline_phase = phase
        if self._timer_at > deadline:  # no timer (INF), or one that fires too late
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = INF
        deadline = self._deadline
        if deadline == INF or self.closed:
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
            return
        if self._phase == IDLE:
            self._close()  # keep-alive timeout: nothing to say
        elif self._phase == LINGER:
            self.abort()
        else:
            what = "headers" if self._phase == HEADERS else "body"
            self._reject(RequestTimeout(f"the client took too long to send the request {what}"))
