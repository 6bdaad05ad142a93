"""Observe (and lightly edit) a streamed response body without buffering it.

``tap_body(body, tap)`` wraps a streamed ``Response.body``: every chunk goes through
``tap.feed(chunk)``, which returns the bytes to pass on now (usually the chunk itself), and
``tap.end(exc)`` runs exactly once when the body ends — ``exc`` is None at a clean end, else the
upstream failure or ``asyncio.CancelledError`` when the client went away — and returns any bytes
still to send. A tap must be cheap: it runs once per chunk, on the hot path.

When the wrapped body is a :class:`proxy.http.PipeableBody`, so is the wrapper: ``pipe(sink)``
pipes the inner body into the wrapper, which feeds the tap and writes to ``sink``, all by
callbacks, no task per chunk; ``pause_producing``/``resume_producing``/``abort`` pass through.
Either way it also works as an async iterator.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Protocol, cast

from proxy.http import BodySink, PipeableBody, Response

log = logging.getLogger("llm_sidecar.body")


class BodyTap(Protocol):
    # False when feed() may drop or hold back bytes: the body's length is then unknown in advance.
    keeps_length: bool

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to pass on now for ``chunk`` (``b""`` holds it back or drops it)."""
        ...

    def end(self, exc: BaseException | None) -> bytes:
        """Called once when the body ends; returns bytes still to send (only used when exc is None)."""
        ...


class TappedIterator:
    """A streamed body (an async iterator of bytes) seen through a tap."""

    __slots__ = ("_ended", "_exhausted", "_inner", "_tap", "length")

    def __init__(self, inner: AsyncIterator[bytes], tap: BodyTap) -> None:
        self._inner = inner
        self._tap = tap
        self._ended = False
        self._exhausted = False
        # Content-Length of the inner body, when the tap does not change the bytes.
        self.length: int | None = getattr(inner, "length", None) if tap.keeps_length else None

    def _end(self, exc: BaseException | None) -> bytes:
        if self._ended:
            return b""
        self._ended = True
        return self._tap.end(exc)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        while not self._exhausted:
            try:
                chunk = await self._inner.__anext__()
            except StopAsyncIteration:
                self._exhausted = True
                rest = self._end(None)
                if rest:
                    return rest
                break
            except BaseException as e:
                self._exhausted = True
                self._end(e)
                raise
            out = self._tap.feed(chunk)
            if out:
                return out
        raise StopAsyncIteration

    def abort(self) -> None:
        """Dropped unread (the client left before the head went out): end the tap, stop the inner."""
        self._exhausted = True
        self._end(asyncio.CancelledError())
        abort = getattr(self._inner, "abort", None)
        if abort is not None:
            abort()

    async def aclose(self) -> None:
        self._exhausted = True
        self._end(asyncio.CancelledError())
        aclose = getattr(self._inner, "aclose", None)
        if aclose is not None:
            await aclose()
        else:
            abort = getattr(self._inner, "abort", None)
            if abort is not None:
                abort()


class TappedBody(TappedIterator):
    """A :class:`PipeableBody` seen through a tap; itself pipeable, and the inner body's sink."""

    __slots__ = ("_pipeable", "_sink")

    def __init__(self, inner: PipeableBody, tap: BodyTap) -> None:
        super().__init__(inner, tap)
        self._pipeable = inner
        self._sink: BodySink | None = None

    # -- PipeableBody ------------------------------------------------------------------------------
    def pipe(self, sink: BodySink) -> None:
        self._sink = sink
        self._pipeable.pipe(self)

    def pause_producing(self) -> None:
        self._pipeable.pause_producing()

    def resume_producing(self) -> None:
        self._pipeable.resume_producing()

    def abort(self) -> None:
        """The client went away: stop the upstream, and tell the tap (no callback will)."""
        self._exhausted = True
        self._pipeable.abort()
        self._end(asyncio.CancelledError())

    # -- BodySink: the inner body writes here --------------------------------------------------------
    def write(self, data: bytes) -> None:
        out = self._tap.feed(data)
        if out and self._sink is not None:
            self._sink.write(out)

    def finish(self) -> None:
        rest = self._end(None)
        sink = self._sink
        if sink is not None:
            if rest:
                sink.write(rest)
            sink.finish()

    def fail(self, exc: BaseException) -> None:
        self._end(exc)
        if self._sink is not None:
            self._sink.fail(exc)


def tap_body(body: AsyncIterator[bytes], tap: BodyTap) -> TappedIterator:
    """Wrap a streamed body; the wrapper is pipeable exactly when ``body`` is."""
    if callable(getattr(body, "pipe", None)):
        return TappedBody(cast(PipeableBody, body), tap)
    return TappedIterator(body, tap)


async def aclose_body(body: AsyncIterator[bytes]) -> None:
    """Close a streamed body a front stops reading (its ``aclose``, when it has one)."""
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:
            log.debug("error closing a response body", exc_info=True)


def is_event_stream(response: Response) -> bool:
    """An SSE response: one cut short after its head went out ends with an error event
    (``proxy.errors.sse_error_event``), which the openai SDK raises, not with a bare cut."""
    content_type = response.headers.get(b"content-type")
    return content_type is not None and content_type.startswith(b"text/event-stream")


def discard_body(response: Response) -> None:
    """Drop a response that will never be sent: abort its streamed body, if any."""
    body = response.body
    if not isinstance(body, bytes):
        abort = getattr(body, "abort", None)
        if abort is not None:
            abort()
