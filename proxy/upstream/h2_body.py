"""The body of one HTTP/2 upstream response: a PipeableBody whose backpressure is flow control.

Received DATA is acknowledged to the upstream (WINDOW_UPDATE, batched by h2 at half a window)
only when the consumer takes it: written to the front's sink while it is not paused, or returned
by ``__anext__``. A slow client therefore leaves the stream's window closed and the upstream stops
sending that stream; what waits here is bounded by the stream's receive window
(``upstreams.<name>.h2_window_bytes``), and the connection's other streams go on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from proxy.http import BodySink

if TYPE_CHECKING:
    from proxy.upstream.h2_conn import H2UpstreamConnection


class H2Body:
    """The rest of a streamed response on stream ``sid``. Piped (callbacks) or iterated, not both."""

    __slots__ = ("_buf", "_conn", "_done", "_exc", "_paused", "_sink", "_waiter", "length", "sid")

    def __init__(self, conn: H2UpstreamConnection, sid: int, length: int | None) -> None:
        self._conn = conn
        self.sid = sid
        self._buf: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length), not acknowledged
        self._sink: BodySink | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._done = False  # no more data will come (ended, failed or aborted)
        self._exc: BaseException | None = None
        self._paused = False
        self.length = length  # content-length of the upstream response, when it sent one

    # -- fed by the connection -------------------------------------------------------------------
    def feed(self, data: bytes, flow: int) -> None:
        sink = self._sink
        if sink is not None and not self._paused and not self._buf:
            self._conn.acknowledge(self.sid, flow)
            if data:
                sink.write(data)
            return
        self._buf.append((data, flow))
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def end(self, exc: BaseException | None) -> None:
        if self._done:
            return
        self._done = True
        self._exc = exc
        sink = self._sink
        if sink is not None:
            if self._buf and exc is None:
                return  # paused with data still queued: resume_producing finishes
            self._buf.clear()
            if exc is None:
                sink.finish()
            else:
                sink.fail(exc)
        else:
            w = self._waiter
            if w is not None and not w.done():
                w.set_result(None)

    @property
    def waiting(self) -> bool:
        """Data is queued for a consumer that has not taken it: the window is ours to reopen."""
        return bool(self._buf)

    # -- PipeableBody ----------------------------------------------------------------------------
    def pipe(self, sink: BodySink) -> None:
        self._sink = sink
        self._drain()

    def pause_producing(self) -> None:
        self._paused = True

    def resume_producing(self) -> None:
        self._paused = False
        if self._sink is not None:
            self._drain()

    def _drain(self) -> None:
        """Hand queued chunks to the sink (and their window back upstream) until it pauses us."""
        sink = self._sink
        assert sink is not None
        buf = self._buf
        conn = self._conn
        while buf and not self._paused:
            data, flow = buf.popleft()
            conn.acknowledge(self.sid, flow)
            if data:
                sink.write(data)
        conn.flush_soon()
        if self._done and not buf and self._sink is sink:
            self._sink = None
            if self._exc is None:
                sink.finish()
            else:
                sink.fail(self._exc)

    def abort(self) -> None:
        """The client went away: RST_STREAM CANCEL, so the backend stops generating."""
        self._buf.clear()
        self._sink = None
        if not self._done:
            self._done = True
            self._exc = asyncio.CancelledError()
            self._conn.cancel_stream(self.sid)

    # -- async iterator --------------------------------------------------------------------------
    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        buf = self._buf
        while True:
            while buf:
                data, flow = buf.popleft()
                self._conn.acknowledge(self.sid, flow)
                self._conn.flush_soon()
                if data:
                    return data
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

    async def aclose(self) -> None:
        self.abort()
