"""``log.access_log: true``: one line per request that reached the chain, when its response is complete.

For a streamed answer that is the end of the stream, not its head. The line has the request id,
client, method, path, route (the client's model), tenant, identity (API key id), the upstream and
model that served it, status, ``error_type`` (the sidecar's own error answers), ``outcome``
(``client_closed``: the client left before the end; ``upstream_failed``: the upstream broke off a
stream), bytes in and out, tokens in and out (the answer's ``usage``, whole or streamed),
``ttft_ms`` (streams: complete request → first body chunk), ``duration_ms``, ``attempts`` and
``cache`` (``ctx.extra["cache"]``, when a cache middleware set one). Never the prompt or the
completion, unless ``log.bodies: true``: then the request and response bodies, each cut at 64 KiB.

On the event loop it only gathers references and numbers into a tuple (:data:`AccessEntry`) and
hands it to a sink: :meth:`proxy.logs.LogHandle.access` (a bounded queue's put), or, when none is
given, a record of the ``llm_sidecar.access`` logger. Reading the usage, building the text or JSON
and writing happen in the log thread (:mod:`proxy.logs`), with :func:`access_fields` and
:func:`access_text`. A streamed answer is counted chunk by chunk (bytes, the first chunk's time,
its last two chunks: where the usage is), nothing more. A ``usage`` a middleware put in
``ctx.extra["usage"]`` (a :class:`proxy.usage.Usage`) is taken as it is, not read again.
Requests the front rejects before the chain (malformed, oversize, timeouts) are not logged here.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable
from typing import Any, Final, cast

import orjson

from proxy.body import TappedBody, tap_body
from proxy.chain import Handler
from proxy.clock import Clock
from proxy.config import LogConfig
from proxy.errors import ProxyError
from proxy.http import PipeableBody, Request, Response
from proxy.requested_model import read_model
from proxy.usage import MAX_USAGE_BODY, USAGE_KEY, Tokens, Usage, tokens_in

ACCESS_LOGGER: Final = "llm_sidecar.access"
MAX_BODY_LOGGED: Final = 64 * 1024  # log.bodies: each body is cut here, with a marker
USAGE_AT: Final = 10  # AccessEntry's usage source
CACHE_KEY: Final = "cache"  # ctx.extra: the cache's result for this request (hit, miss, …)
CLIENT_CLOSED: Final = "client_closed"
UPSTREAM_FAILED: Final = "upstream_failed"
CLIENT_CLOSED_STATUS: Final = 499  # no answer went out: the client left while the chain worked

# (wall time, ctx, method, path, route, status, error_type, outcome, bytes in, bytes out,
#  usage source (the answer, its last two chunks, or the Tokens read from them), first chunk time,
#  end time, request body, response body):
# references and numbers put together on the loop, read in the log thread by access_fields.
AccessEntry = tuple[Any, ...]
AccessSink = Callable[[AccessEntry], object]  # (what it returns is not used)

log = logging.getLogger(ACCESS_LOGGER)


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


# -- in the log thread ---------------------------------------------------------------------------


def access_fields(entry: AccessEntry, stamp: str | None = None) -> dict[str, Any]:
    """The fields of an access line, in order: ``time`` (``stamp``), ``level``, ``logger``, then the
    request's; the optional ones (error_type, outcome, tokens, ttft_ms, cache, bodies) only when
    they have a value."""
    (
        _,
        ctx,
        method,
        path,
        route,
        status,
        error_type,
        outcome,
        bytes_in,
        bytes_out,
        usage_source,
        first_chunk,
        end,
        body_in,
        body_out,
    ) = entry
    target = ctx.target
    started = ctx.started
    fields: dict[str, Any] = {
        "time": stamp,
        "level": "info",
        "logger": ACCESS_LOGGER,
        "request_id": ctx.request_id.decode("latin-1"),
        "client": ctx.client,
        "method": method,
        "path": path,
        "route": route,
        "tenant": ctx.tenant,
        "identity": ctx.identity,
        "upstream": None if target is None else target.upstream,
        "model": None if target is None else target.model,
        "status": status,
    }
    if error_type is not None:
        fields["error_type"] = error_type
    if outcome is not None:
        fields["outcome"] = outcome
    fields["bytes_in"] = bytes_in
    fields["bytes_out"] = bytes_out
    extra = ctx._extra or _NO_EXTRA  # read, not made: this thread must not write to the request
    usage = extra.get(USAGE_KEY)
    if isinstance(usage, Usage):
        fields["tokens_in"] = usage.prompt_tokens
        fields["tokens_out"] = usage.completion_tokens
    elif usage_source is not None:  # (Tokens: read already, by the metrics)
        tokens = usage_source if type(usage_source) is Tokens else tokens_in(usage_source)
        if tokens is not None:
            fields["tokens_in"], fields["tokens_out"] = tokens.prompt, tokens.completion
    if first_chunk >= 0:
        fields["ttft_ms"] = _ms(first_chunk - started)
    fields["duration_ms"] = _ms(end - started)
    fields["attempts"] = ctx.attempt + 1
    cache = extra.get(CACHE_KEY)
    if cache is not None:
        fields["cache"] = cache
    if body_in is not None:
        fields["request_body"] = _clip(body_in, bytes_in)
    if body_out is not None:
        fields["response_body"] = _clip(bytes(body_out), bytes_out)
    return fields


_NO_EXTRA: Final[dict[str, Any]] = {}


def _ms(seconds: float) -> float:
    """Milliseconds to the µs (``round(x, 3)`` costs three times as much, once per line)."""
    return int(seconds * 1e6 + 0.5) / 1000 if seconds >= 0 else -int(-seconds * 1e6 + 0.5) / 1000


def access_text(fields: dict[str, Any]) -> str:
    """The text form: ``<request id> <client> "<METHOD> <path>" <status> <upstream/model> <ms>ms``
    (``-`` when the sidecar answered), then ``key=value`` for the other fields that have one."""
    upstream = fields["upstream"]
    served_by = f"{upstream}/{fields['model']}" if upstream is not None else "-"
    parts = [
        f'{fields["request_id"]} {fields["client"]} "{fields["method"]} {fields["path"]}"'
        f" {fields['status']} {served_by} {fields['duration_ms']:.1f}ms"
    ]
    for key, value in fields.items():
        if value is not None and key not in _IN_HEAD:
            if isinstance(value, str) and (not value or _NEEDS_QUOTES.search(value) is not None):
                value = orjson.dumps(value).decode()
            parts.append(f"{key}={value}")
    return " ".join(parts)


_IN_HEAD: Final = frozenset(
    {
        "time",
        "level",
        "logger",
        "request_id",
        "client",
        "method",
        "path",
        "status",
        "upstream",
        "model",
        "duration_ms",
    }
)
_NEEDS_QUOTES: Final = re.compile(r'[\s"=\\]')


def _clip(body: bytes, total: int) -> str:
    text = body[:MAX_BODY_LOGGED].decode("utf-8", "replace")
    if total > MAX_BODY_LOGGED:
        text += f"…[{total - MAX_BODY_LOGGED} more bytes]"
    return text


class _LazyText:
    """The message of an access record made without proxy.logs: built only if a handler formats it."""

    __slots__ = ("entry",)

    def __init__(self, entry: AccessEntry) -> None:
        self.entry = entry

    def __str__(self) -> str:
        return access_text(access_fields(self.entry))


def log_record_sink(entry: AccessEntry) -> None:
    """Without a :class:`proxy.logs.LogHandle`: a record of the ``llm_sidecar.access`` logger,
    whatever ``log.level`` (``access_log`` is its own switch); ``record.access`` is the entry."""
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 0, _LazyText(entry), None, None)
    record.access = entry
    log.handle(record)
