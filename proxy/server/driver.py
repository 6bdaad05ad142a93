"""The one request driver both fronts call (HTTP/1.1 and HTTP/2), so that what a client is
answered never depends on the protocol it speaks.

A front parses bytes into a method, target, headers and body; the driver makes the
:class:`~proxy.http.Request` (request id, start time from the injected clock), answers what the
sidecar answers itself before the chain (``/healthz``), runs the chain with the one mapping of
failures to answers, and makes the errors a front raises before a request is complete (413, 431,
400, 408) carry a request id like every other answer. The front then writes the response in its
own framing.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import orjson

from proxy.access_log import AccessLog
from proxy.chain import Handler
from proxy.clock import Clock
from proxy.config import LimitsConfig
from proxy.errors import HeadersTooLarge, PayloadTooLarge, ProxyError, error_body, internal_error
from proxy.http import Headers, Request, RequestContext, Response
from proxy.metrics import CLIENT_CLOSED, Metrics

log = logging.getLogger("llm_sidecar.front")

# A client's x-request-id longer than this is replaced by ours (it goes into logs and upstreams).
MAX_REQUEST_ID = 200
HEAD_METHODS = frozenset({"GET", "HEAD"})


def error_response(err: ProxyError) -> Response:
    """The one place a typed error becomes what the client sees (OpenAI error shape)."""
    headers = Headers([(b"content-type", b"application/json")])
    headers.extend(err.headers)
    return Response(err.status, headers, error_body(err))


class Generation:
    """One chain and the requests it serves. A reload makes a new one current; the old one serves
    what it had until its last response is complete, then ``on_idle`` runs (once)."""

    __slots__ = ("handler", "in_flight", "on_idle")

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.in_flight = 0  # requests started on it whose responses are not complete
        self.on_idle: Callable[[], None] | None = None  # set when it is replaced

    def retire(self, on_idle: Callable[[], None]) -> None:
        self.on_idle = on_idle
        if not self.in_flight:
            self._idle()

    def _idle(self) -> None:
        on_idle, self.on_idle = self.on_idle, None
        if on_idle is not None:
            on_idle()


class RequestDriver:
    def __init__(self, handler: Handler, limits: LimitsConfig, clock: Clock) -> None:
        self.current = Generation(handler)
        self.retiring: list[Generation] = []  # replaced by a reload, maybe still serving (in_flight)
        self.limits = limits
        self.clock = clock
        self.metrics: Metrics | None = None  # set by App when metrics are on (admin.enabled)
        self.server_timing = False  # set by App from the config's server_timing
        # The access log's and the metrics' view of each answer (proxy/access_log.py), set by App
        # when either is on: called here, not as a middleware, so it costs no coroutine frame.
        self.access: AccessLog | None = None
        self._rid_prefix = os.urandom(6).hex().encode() + b"-"
        self._rid_counter = 0
        # Answered before the chain, to GET and HEAD: liveness for systemd/k8s probes.
        self._local: dict[bytes, bytes] = {b"/healthz": orjson.dumps({"status": "ok"})}

    def next_request_id(self) -> bytes:
        self._rid_counter += 1
        return b"%b%d" % (self._rid_prefix, self._rid_counter)

    def request_id(self, client_rid: bytes | None) -> bytes:
        """The client's x-request-id when it sent a usable one, else a new one of ours."""
        if client_rid is None or len(client_rid) > MAX_REQUEST_ID:
            return self.next_request_id()
        return client_rid

    def request(
        self,
        method: str,
        raw_target: bytes,
        headers: Headers,
        body: bytes,
        peer: str,
        client_rid: bytes | None,
    ) -> Request:
        """A complete request. ``client_rid`` is the client's x-request-id header, if any; the
        forwarded headers carry the id this request is known by."""
        if client_rid is None:  # (request_id, inlined for the common case)
            self._rid_counter += 1
            rid = b"%b%d" % (self._rid_prefix, self._rid_counter)
            headers.append((b"x-request-id", rid))
        else:
            rid = self.request_id(client_rid)
            if rid is not client_rid:
                headers.set(b"x-request-id", rid)
        ctx = RequestContext(rid, peer, self.clock.now())
        ctx.body_in = body
        ctx.build = build = self.current
        build.in_flight += 1
        return Request(method, raw_target, headers, body, ctx)

    def done(self, request: Request) -> None:
        """The response is complete, or will never be (the client left). Once per request: the
        fronts call it wherever a response ends, and only the first call counts."""
        ctx = request.ctx
        build = ctx.build
        if build is not None:
            ctx.build = None
            metrics = self.metrics
            if metrics is not None:
                metrics.done(request)
            build.in_flight -= 1
            if not build.in_flight and build.on_idle is not None:
                build._idle()

    def swap(self, handler: Handler) -> Generation:
        """Make ``handler`` serve new requests (reload); returns the generation it replaced."""
        old, self.current = self.current, Generation(handler)
        self.retiring = [g for g in self.retiring if g.in_flight]
        self.retiring.append(old)
        return old

    def in_flight(self) -> int:
        """Requests received whose response is not complete, on every generation (scrape time)."""
        self.retiring = [g for g in self.retiring if g.in_flight]
        return self.current.in_flight + sum(g.in_flight for g in self.retiring)

    def local_answer(self, request: Request) -> Response | None:
        """What the sidecar answers itself, without the chain (None: the chain answers)."""
        if request.method in HEAD_METHODS:
            body = self._local.get(request.raw_target)
            if body is not None:
                return Response(200, Headers([(b"content-type", b"application/json")]), body)
        return None

    # A front runs the chain as ``respond`` does, inlined (a coroutine frame less per request):
    #     try:
    #         response = await driver.chain(request)(request)
    #     except BaseException as e:
    #         response = driver.failed(request, e)  # re-raises the client leaving
    #     else:
    #         driver.answered(request, response)
    async def respond(self, request: Request) -> Response:
        """Run the chain; every failure becomes an answer, except the client leaving (the front
        cancelled the task), which propagates as CancelledError."""
        try:
            response = await self.chain(request)(request)
        except BaseException as e:
            return self.failed(request, e)
        self.answered(request, response)
        return response

    def chain(self, request: Request) -> Handler:
        """The chain of the generation the request started on."""
        build = request.ctx.build  # (None: already done, the client gone)
        return build.handler if build is not None else self.current.handler

    def answered(self, request: Request, response: Response, exc: BaseException | None = None) -> None:
        """The chain answered ``response`` (or raised ``exc``, which ``response`` answers)."""
        metrics = self.metrics
        tokens = metrics.answered(request, response.status, response.body) if metrics is not None else None
        access = self.access
        if access is not None:
            if exc is None:
                access.answered(request, response, request.ctx.body_in, tokens)
            else:
                access.raised(request, exc, request.ctx.body_in)
        if self.server_timing:
            response.headers.append((b"server-timing", self.timing(request)))

    def timing(self, request: Request) -> bytes:
        """``Server-Timing``: the sidecar's own time and the upstreams' (every attempt's send to its
        response head) until now, in ms. A streamed answer's head goes out before its body: its
        figures stop at the head."""
        ctx = request.ctx
        upstream = ctx.upstream_s
        own = self.clock.now() - ctx.started - upstream
        return b"proxy;dur=%.3f, upstream;dur=%.3f" % (max(own, 0.0) * 1000, upstream * 1000)

    def failed(self, request: Request, exc: BaseException) -> Response:
        """The one mapping of what the chain raised to what the client gets. The client leaving
        (the front cancelled the task) and what is not an Exception are raised again."""
        if isinstance(exc, ProxyError):
            response = error_response(exc)
        elif isinstance(exc, asyncio.CancelledError):
            task = asyncio.current_task()
            if request.ctx.disconnected or (task is not None and task.cancelling()):
                if self.metrics is not None:
                    self.metrics.answered(request, CLIENT_CLOSED)
                if self.access is not None:
                    self.access.raised(request, exc, request.ctx.body_in)
                raise exc
            # raised inside the chain (a bug), the client still there: an error, not silence
            log.error("request %s %s was cancelled inside the chain", request.method, request.path)
            response = error_response(internal_error())
        elif isinstance(exc, Exception):
            log.error("unhandled error for %s %s", request.method, request.path, exc_info=exc)
            response = error_response(internal_error())
        else:
            raise exc
        self.answered(request, response, exc)
        return response

    def early_error(self, err: ProxyError, client_rid: bytes | None) -> Response:
        """The answer to a request refused before it was complete: with a request id too."""
        response = error_response(err)
        response.headers.append((b"x-request-id", self.request_id(client_rid)))
        if self.metrics is not None:
            self.metrics.refuse(err.status)
        return response

    def too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(
            f"request body exceeds {self.limits.max_body_bytes} bytes (limits.max_body_bytes)"
        )

    def headers_too_large(self) -> HeadersTooLarge:
        return HeadersTooLarge(
            f"request headers exceed {self.limits.max_header_bytes} bytes (limits.max_header_bytes)"
        )
