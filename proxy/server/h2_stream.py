"""One HTTP/2 stream of the front: the request as it arrives, the response as it leaves.

A stream is the ``BodySink`` a streamed upstream body is piped into. What the client's
flow-control window does not let out yet waits in ``pending``; above
``http2.stream_buffer_bytes`` the producer is paused (``pause_producing``: the upstream
connection stops being read) and it resumes once the client's WINDOW_UPDATEs drained the queue
to half of that. The connection (proxy/server/h2.py) does the sending.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import TYPE_CHECKING

from proxy.http import Headers, PipeableBody, Request

if TYPE_CHECKING:
    from proxy.server.h2 import H2Connection

INF = float("inf")


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
        "stalled_at",
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

    # -- BodySink --------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self.reset or not data:
            return
        self.pending.append(data)
        self.pending_bytes += len(data)
        conn = self.conn
        conn.send_pending(self)
        if self.pending_bytes > conn.cfg.stream_buffer_bytes and not self.paused and not self.reset:
            self.paused = True
            if self.producer is not None:
                self.producer.pause_producing()
        conn.flush()

    def finish(self) -> None:
        self.producer = None
        conn = self.conn
        if not self.reset:
            self.end_pending = True
            conn.send_pending(self)
            conn.flush()
        conn.forget_if_done(self)

    def fail(self, exc: BaseException) -> None:
        """The upstream failed mid-body: RST_STREAM tells the client the response is cut short."""
        self.producer = None
        self.conn.stream_failed(self, exc)

    # -- called by the connection ------------------------------------------------------------------
    def drained(self) -> None:
        """``pending`` fell to half the bound: let the producer go on."""
        self.paused = False
        if self.producer is not None:
            self.producer.resume_producing()
        drain = self.drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def cancel(self) -> None:
        """Reset (by either side) or the connection is gone: stop the upstream work."""
        self.reset = True
        self.pending.clear()
        self.pending_bytes = 0
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
