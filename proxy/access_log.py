"""``log.access_log: true``: one line per request that reached the chain, when its response is complete.

For a streamed answer that is the end of the stream, not its head. The line has the request id,
client, method, path, route (the client's model), tenant, identity (API key id), the upstream and
model that served it, status, ``error_type`` (the sidecar's own error answers), ``outcome``
(``client_closed``: the client left before the end; ``upstream_failed``: the upstream broke off a
stream), bytes in and out, tokens in and out (the answer's ``usage``, whole or streamed),
``ttft_ms`` (streams: complete request → first body chunk), ``duration_ms``, ``attempts`` and
``cache`` (``ctx.extra["cache"]``, when a cache middleware set one). Never the prompt or the
completion, unless ``log.bodies: true``: then the request and response bodies, each cut at 64 KiB.

On the event loop it only gathers references and numbers into a tuple (an ``AccessEntry``, see
:mod:`proxy.access_format`) and hands it to a sink: :meth:`proxy.logs.LogHandle.access` (a bounded
queue's put), or, when none is given, a record of the ``llm_sidecar.access`` logger. Reading the
usage, building the text or JSON and writing happen in the log thread (:mod:`proxy.logs`, with
:mod:`proxy.access_format`). A streamed answer is counted chunk by chunk (bytes, the first chunk's
time, its last two chunks: where the usage is), nothing more. A ``usage`` a middleware put in
``ctx.extra["usage"]`` (a :class:`proxy.usage.Usage`) is taken as it is, not read again.
Requests the front rejects before the chain (malformed, oversize, timeouts) are not logged here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final, cast

from proxy.access_format import (
    MAX_BODY_LOGGED,
    AccessSink,
    log_record_sink,
)
from proxy.body import TappedBody, tap_body
from proxy.chain import Handler
from proxy.clock import Clock
from proxy.config import LogConfig
from proxy.errors import ProxyError
from proxy.http import PipeableBody, Request, Response
from proxy.requested_model import read_model
from proxy.usage import MAX_USAGE_BODY, Tokens

CLIENT_CLOSED: Final = "client_closed"
UPSTREAM_FAILED: Final = "upstream_failed"
CLIENT_CLOSED_STATUS: Final = 499  # no answer went out: the client left while the chain worked


class AccessLog:
    """The accounting of each answer the chain gives: called by the request driver
    (:meth:`answered` and :meth:`raised`, no coroutine frame of its own per request), or used as a
    middleware (:meth:`__call__`, the same two steps around ``next``).

    ``sink``: where entries go; :meth:`proxy.logs.LogHandle.access` is the cheap one. Without it an
    entry becomes a record of the ``llm_sidecar.access`` logger (works with any handler, costs a
    ``LogRecord`` per request on the loop).
    """

    def __init__(
        self,
        clock: Clock,
        cfg: LogConfig | None = None,
        sink: AccessSink | None = None,
        wall: Callable[[], float] = time.time,
        whole: bool = True,
        stream_sink: AccessSink | None = None,
    ) -> None:
        self.clock = clock
        self.bodies = cfg.bodies if cfg is not None else False
        self.sink: AccessSink = sink if sink is not None else log_record_sink
        self.wall = wall
        # False: only streamed answers give entries (for the metrics, which count whole answers
        # and errors themselves: no access log is written).
        self.whole = whole
        # Where a streamed answer's entry goes at its end (default: ``sink``): the metrics read
        # its tokens and timings there, as they do not at its head.
        self.stream_sink: AccessSink = stream_sink if stream_sink is not None else self.sink

    async def __call__(self, request: Request, next: Handler) -> Response:
        body_in = request.body  # the client's, before any middleware rewrites it
        try:
            response = await next(request)
        except BaseException as e:
            self.raised(request, e, body_in)
            raise
        self.answered(request, response, body_in)
        return response

    def raised(self, request: Request, exc: BaseException, body_in: bytes) -> None:
        """The chain raised ``exc`` instead of answering: its line now (the driver answers it)."""
        if not self.whole:
            return
        if isinstance(exc, ProxyError):
            self.emit(request, body_in, exc.status, exc.code or exc.type, None, 0, None, -1.0, None)
        elif isinstance(exc, asyncio.CancelledError) and request.ctx.disconnected:
            self.emit(request, body_in, CLIENT_CLOSED_STATUS, None, CLIENT_CLOSED, 0, None, -1.0, None)
        else:  # a cancellation inside the chain, or a bug: the driver answers 500
            self.emit(request, body_in, 500, "internal_error", None, 0, None, -1.0, None)

    def answered(
        self, request: Request, response: Response, body_in: bytes, tokens: Tokens | None = None
    ) -> None:
        """A complete answer gets its line now; a streamed one is wrapped to count what it sends,
        and gets its line at its end. ``body_in``: the client's request body; ``tokens``: the
        answer's, when the metrics read them already."""
        body = response.body
        if isinstance(body, bytes):  # complete (inline: this is the common case)
            if not self.whole:
                return
            bodies = self.bodies
            self.sink(
                (
                    self.wall(),
                    request.ctx,
                    request.method,
                    request.path,
                    route_of(request),
                    response.status,
                    None,
                    None,
                    len(body_in),
                    len(body),
                    tokens if tokens is not None else body if len(body) <= MAX_USAGE_BODY else None,
                    -1.0,
                    self.clock.now(),
                    body_in[:MAX_BODY_LOGGED] if bodies else None,
                    body[:MAX_BODY_LOGGED] if bodies else None,
                )
            )
        elif callable(getattr(body, "pipe", None)):
            response.body = AccessBody(cast(PipeableBody, body), self, request, body_in, response)
        else:
            response.body = tap_body(body, StreamTap(self, request, body_in, response))

    def emit(
        self,
        request: Request,
        body_in: bytes,
        status: int,
        error_type: str | None,
        outcome: str | None,
        bytes_out: int,
        usage_source: Any,
        first_chunk: float,
        body_out: Any,
        streamed: bool = False,
    ) -> None:
        (self.stream_sink if streamed else self.sink)(
            (
                self.wall(),
                request.ctx,
                request.method,
                request.path,
                route_of(request),
                status,
                error_type,
                outcome,
                len(body_in),
                bytes_out,
                usage_source,
                first_chunk,
                self.clock.now(),
                body_in[:MAX_BODY_LOGGED] if self.bodies else None,
                body_out,
            )
        )


def route_of(request: Request) -> str | None:
    """The client's model: read once by the forwarder (or a middleware), cached on the request."""
    read = request.model_read
    if read is not None and read[0] is request.body:
        route: str | None = read[1][0]
        return route
    try:
        return read_model(request)[0]
    except ProxyError:  # a body that is not JSON: the line says what was answered, no route
        return None


# _Counting's attributes: slots of each concrete class (with TappedBody's slots beside them, a base
# with slots of its own would not fit in one layout).
_COUNTING_SLOTS = (
    "_access",
    "_body_in",
    "_kept",
    "_request",
    "_response",
    "c1",
    "c2",
    "first",
    "keeps_length",
    "sent",
)


class _Counting:
    """What a streamed answer's accounting does, for :class:`StreamTap` and :class:`AccessBody`:
    the bytes sent, the first chunk's time, the last two chunks (where a stream's usage event, or
    a JSON answer's ``usage``, is), with ``log.bodies`` its first 64 KiB; its line at the end."""

    # No __slots__ here (mypy would not see the subclasses' slots); they have theirs.
    _access: AccessLog
    _request: Request
    _body_in: bytes
    _response: Response
    _kept: bytearray | None
    first: float
    sent: int
    c1: bytes
    c2: bytes

    def _start(self, access: AccessLog, request: Request, body_in: bytes, response: Response) -> None:
        self._access = access
        self._request = request
        self._body_in = body_in
        self._response = response
        self._kept = bytearray() if access.bodies else None
        self.first = -1.0
        self.sent = 0
        self.c1 = self.c2 = b""

    def feed(self, chunk: bytes) -> bytes:
        if self.first < 0:
            self.first = self._access.clock.now()
        self.sent += len(chunk)
        self.c2 = self.c1
        self.c1 = chunk
        kept = self._kept
        if kept is not None and len(kept) < MAX_BODY_LOGGED:
            kept += chunk[: MAX_BODY_LOGGED - len(kept)]
        return chunk

    def end(self, exc: BaseException | None) -> bytes:
        outcome = error_type = None
        if exc is not None:
            if isinstance(exc, asyncio.CancelledError) or self._request.ctx.disconnected:
                outcome = CLIENT_CLOSED
            else:
                outcome = UPSTREAM_FAILED
                error_type = (exc.code or exc.type) if isinstance(exc, ProxyError) else "internal_error"
        response = self._response
        self._access.emit(
            self._request,
            self._body_in,
            response.status,
            error_type,
            outcome,
            self.sent,
            (self.c2, self.c1) if exc is None else None,
            self.first,
            self._kept,
            True,
        )
        return b""


class StreamTap(_Counting):
    """The accounting as a body tap (proxy/body.py), for a streamed body that is not pipeable."""

    __slots__ = _COUNTING_SLOTS

    def __init__(self, access: AccessLog, request: Request, body_in: bytes, response: Response) -> None:
        self.keeps_length = True
        self._start(access, request, body_in, response)


class AccessBody(_Counting, TappedBody):
    """A pipeable streamed body with the accounting built in: the inner body writes each chunk
    here, which counts it and writes it on (one call per chunk, not a tap's two)."""

    __slots__ = _COUNTING_SLOTS

    def __init__(
        self, inner: PipeableBody, access: AccessLog, request: Request, body_in: bytes, response: Response
    ) -> None:
        self.keeps_length = True
        TappedBody.__init__(self, inner, self)  # its own tap: iterated, it feeds itself
        self._start(access, request, body_in, response)

    def write(self, data: bytes) -> None:
        self.feed(data)  # (it counts, and hands the chunk back unchanged)
        sink = self._sink
        if sink is not None:
            sink.write(data)
