"""One HTTP/2 stream of the front: the request as it arrives, the response as it leaves.

The connection (proxy/server/h2.py) collects the request; :meth:`H2Stream.respond` runs it
through the chain and sends the response: HEADERS, then DATA within the client's flow-control
windows. A stream is the ``BodySink`` a streamed upstream body is piped into. What the windows
do not let out yet waits in ``pending``; above ``http2.stream_buffer_bytes`` the producer is
paused (``pause_producing``: the upstream connection stops being read), and it resumes once the
client's WINDOW_UPDATEs have drained the queue to half of that. A stream that can send nothing
for ``http2.send_timeout_s`` is reset by the connection's timer (``stalled_at``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, cast

from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError, StreamClosedError

from proxy.body import aclose_body, discard_body, is_event_stream
from proxy.errors import ProxyError, sse_error_event
from proxy.http import HOP_BY_HOP, Headers, PipeableBody, Request, Response
from proxy.server.driver import error_response

if TYPE_CHECKING:
    from proxy.server.h2 import H2Connection

log = logging.getLogger("llm_sidecar.front")

INF = float("inf")
# Response headers an HTTP/2 response must not carry (h2 is not asked to check) or that we compute.
_RESPONSE_DROP = HOP_BY_HOP | {b"content-length"}
_STATUS = {code: b"%d" % code for code in range(100, 600)}


class H2Stream:
    __slots__ = (
        "body",
        "body_bytes",
        "conn",
        "deadline",
        "drain",
        "end_pending",
        "ended",
        "head_only",
        "headers",
        "method",
        "path",
        "paused",
        "pending",
        "pending_bytes",
        "producer",
        "request",
        "request_done",
        "reset",
        "responding",
        "sid",
        "sse",
        "stalled_at",
        "streaming",
        "task",
    )

    def __init__(self, conn: H2Connection, sid: int, method: str, path: bytes, headers: Headers) -> None:
        self.conn = conn
        self.sid = sid
        self.method = method
        self.path = path
        self.headers = headers
        self.head_only = method == "HEAD"
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.deadline = INF  # the request body must be complete by then
        self.stalled_at = INF  # blocked by the client since a while: reset it then (send timeout)
        self.sse = False  # the response streaming out is SSE (a failure ends it with an error event)
        self.streaming = False  # a streamed response's head went out: its body is under way
        self.request: Request | None = None
        self.request_done = False  # the client ended its side
        self.responding = False  # a response (or an error answer) is under way
        self.task: asyncio.Task[None] | None = None
        self.producer: PipeableBody | None = None
        self.pending: deque[bytes | memoryview] = deque()
        self.pending_bytes = 0
        self.end_pending = False  # END_STREAM goes out after ``pending``
        self.ended = False  # END_STREAM sent: the response is complete
        self.reset = False  # RST_STREAM sent or received
        self.paused = False  # the producer was asked to pause
        self.drain: asyncio.Future[None] | None = None  # an iterated body waits here while paused

    @property
    def in_flight(self) -> bool:
        """The client would still get something on this stream."""
        return not self.ended and not self.reset

    # -- the response ------------------------------------------------------------------------------
    async def respond(self, request: Request) -> None:
        """The stream's task: the chain, then the response (piped, iterated or whole)."""
        conn = self.conn
        try:
            driver = conn.front.driver
            try:  # (driver.respond, inlined)
                response = await driver.chain(request)(request)
            except BaseException as e:
                response = driver.failed(request, e)
            else:
                driver.answered(request, response)
            if self.reset or conn.closed:
                discard_body(response)
                return
            body = response.body
            if isinstance(body, bytes):
                self.send_whole(response)
            elif hasattr(body, "pipe"):  # a PipeableBody: an UpstreamBody, or a middleware's wrapper
                pipeable = cast(PipeableBody, body)
                length = getattr(body, "length", None)
                self.sse = length is None and is_event_stream(response)  # (as the HTTP/1.1 front)
                self.streaming = True
                self.send_head(response, length)
                if self.head_only or self.reset:
                    pipeable.abort()
                    return
                self.producer = pipeable
                pipeable.pipe(self)  # finish() / fail() complete the response, from upstream callbacks
                if self.paused and self.producer is pipeable:  # the replay filled the buffer
                    pipeable.pause_producing()
            else:
                length = getattr(body, "length", None)
                self.sse = length is None and is_event_stream(response)
                self.streaming = True
                self.send_head(response, length)
                await self._write_iter(body)
        except asyncio.CancelledError:
            pass  # the stream was reset or the connection lost: cancel() has cleaned up
        finally:
            self.task = None
            conn.forget_if_done(self)

    def send_head(
        self, response: Response, length: int | None, end: bool = False, flush: bool = True
    ) -> None:
        conn = self.conn
        headers = [(b":status", _STATUS.get(response.status) or b"%d" % response.status)]
        headers.extend(kv for kv in response.headers if kv[0] not in _RESPONSE_DROP)
        if self.request is not None:
            headers.append((b"x-request-id", self.request.ctx.request_id))
        if length is not None:
            headers.append((b"content-length", b"%d" % length))
        end = end or self.head_only
        try:
            conn.h2.send_headers(self.sid, headers, end_stream=end)
        except (StreamClosedError, ProtocolError) as e:
            log.debug("stream %d of %s: response head not sent: %s", self.sid, conn.peer, e)
            self.cancel()
            return
        if end:
            self.ended = True
            self._after_end()
        if flush and not conn.in_batch:
            conn.flush_soon()

    def send_whole(self, response: Response) -> None:
        """Head and body in one flush (one write to the socket when the window allows)."""
        body = response.body
        assert isinstance(body, bytes)
        conn = self.conn
        self.send_head(response, len(body), end=not body, flush=False)
        if body and not self.ended and not self.reset:
            self.pending.append(body)
            self.pending_bytes += len(body)
            self.end_pending = True
            self.send_pending()
        if not conn.in_batch:
            conn.flush_soon()
        conn.forget_if_done(self)

    def answer_early(self, err: ProxyError) -> None:
        """Answer before the request is complete (413, 408); the rest of the body is refused."""
        self.responding = True
        self.deadline = INF
        self.body = []
        self.send_whole(self.conn.front.driver.early_error(err, self.headers.get(b"x-request-id")))

    async def _write_iter(self, body: AsyncIterator[bytes]) -> None:
        try:
            async for chunk in body:
                self.write(chunk)
                if self.reset:
                    break
                if self.paused:
                    self.drain = self.conn.loop.create_future()
                    await self.drain
        except asyncio.CancelledError:
            await aclose_body(body)
            raise
        except Exception as e:
            await aclose_body(body)
            self.fail(e)
            return
        if self.reset:
            await aclose_body(body)
            return
        self.finish()

    def send_pending(self) -> None:
        """Send what the windows let out of ``pending``, then END_STREAM when it is due."""
        if self.reset or self.ended:
            return
        conn = self.conn
        h2 = conn.h2
        queue = self.pending
        sid = self.sid
        before = self.pending_bytes
        try:
            while queue and not conn.write_paused:
                window = h2.local_flow_control_window(sid)
                if window <= 0:
                    break
                chunk = queue[0]
                size = len(chunk)
                room = min(window, h2.max_outbound_frame_size)
                if size <= room:
                    queue.popleft()
                    last = not queue and self.end_pending
                    h2.send_data(sid, chunk, end_stream=last)
                    self.pending_bytes -= size
                    if last:
                        self.ended = True
                else:
                    view = chunk if isinstance(chunk, memoryview) else memoryview(chunk)
                    queue[0] = view[room:]
                    h2.send_data(sid, view[:room])
                    self.pending_bytes -= room
                conn.guard.note_data_sent()
            if not queue and self.end_pending and not self.ended:
                h2.end_stream(sid)
                self.ended = True
        except (StreamClosedError, ProtocolError) as e:
            log.debug("stream %d of %s: data not sent: %s", sid, conn.peer, e)
            self.cancel()
            return
        blocked = conn.blocked
        if queue:
            if self.pending_bytes < before or self not in blocked:  # the send timeout starts over
                self.stalled_at = conn.loop.time() + conn.cfg.send_timeout_s
                conn.arm(self.stalled_at)
            blocked[self] = None
        elif self in blocked:
            del blocked[self]
            self.stalled_at = INF
        if self.paused and self.pending_bytes <= conn.cfg.stream_buffer_bytes // 2:
            self._drained()
        if self.ended:
            self._after_end()

    def _after_end(self) -> None:
        """The response is complete; a request still being sent is refused (RFC 9113 §8.1)."""
        if not self.request_done and not self.reset:
            self.reset = True
            with contextlib.suppress(StreamClosedError, ProtocolError):
                self.conn.h2.reset_stream(self.sid, ErrorCodes.NO_ERROR)

    # -- BodySink --------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.reset or not data:
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        conn = self.conn
        self.send_pending()
        if self.pending_bytes > conn.cfg.stream_buffer_bytes and not self.paused and not self.reset:
            self.paused = True
            if self.producer is not None:
                self.producer.pause_producing()
        if not conn.in_batch:
            conn.flush_soon()

    def finish(self) -> None:
        self.producer = None
        conn = self.conn
        if not self.reset:
            self.end_pending = True
            self.send_pending()
            if not conn.in_batch:
                conn.flush_soon()
        conn.forget_if_done(self)

    def fail(self, exc: BaseException) -> None:
        """The upstream failed mid-body. An SSE stream ends with an OpenAI-shaped error event (the
        openai SDK raises it); any other body is reset (RST_STREAM): the client sees it cut short."""
        self.producer = None
        conn = self.conn
        if not isinstance(exc, ProxyError | asyncio.CancelledError):
            log.error("stream %d to %s failed: %r", self.sid, conn.peer, exc)
        if self.sse and not isinstance(exc, asyncio.CancelledError):
            self.write(sse_error_event(exc))
            self.finish()
            return
        self.reset_by_us(ErrorCodes.INTERNAL_ERROR)
        conn.flush()
        conn.forget_if_done(self)

    # -- ending it early ---------------------------------------------------------------------------
    def cut(self, err: ProxyError) -> None:
        """The drain ran out: a streamed answer ends as broken streams do, one still in the chain is
        answered with ``err``, a request still arriving is refused with it."""
        task = self.task
        if self.streaming:
            producer, self.producer = self.producer, None
            if producer is not None:
                producer.abort()
            self.fail(err)
        elif self.request is not None:
            self.request.ctx.disconnected = True  # (the driver lets the cancellation through)
            if task is not None and not task.done():
                task.cancel()
            self.send_whole(error_response(err))
        else:
            self.answer_early(err)
        if task is not None and not task.done():
            task.cancel()

    def reset_by_us(self, error_code: int) -> None:
        """RST_STREAM with ``error_code`` (unless the stream is already reset), then cancel()."""
        if not self.reset and not self.conn.closed:
            with contextlib.suppress(StreamClosedError, ProtocolError):
                self.conn.h2.reset_stream(self.sid, error_code)
        self.cancel()

    def cancel(self) -> None:
        """Reset (by either side) or the connection is gone: stop the upstream work."""
        if self.request is not None:
            self.conn.front.driver.done(self.request)
        self.reset = True
        self.pending.clear()
        self.pending_bytes = 0
        self.conn.blocked.pop(self, None)
        producer = self.producer
        if producer is not None:
            self.producer = None
            producer.abort()
        if self.request is not None:
            self.request.ctx.disconnected = True
        task = self.task
        if task is not None and not task.done():
            task.cancel()
        drain = self.drain
        if drain is not None and not drain.done():
            drain.cancel()

    def _drained(self) -> None:
        """``pending`` fell to half the bound: let the producer go on."""
        self.paused = False
        if self.producer is not None:
            self.producer.resume_producing()
        drain = self.drain
        if drain is not None and not drain.done():
            drain.set_result(None)
