"""Typed errors. Each knows its HTTP status and OpenAI error ``type``/``code``.

They are turned into the OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``
in exactly one place, :func:`error_body`, which every front uses.
"""

from __future__ import annotations

from collections.abc import Iterable

import orjson

# What an error adds to its answer's headers: (lower-case name, value) pairs.
ErrorHeaders = Iterable[tuple[bytes, bytes]]


class ProxyError(Exception):
    """An error the client should see, OpenAI-shaped."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    # Safe to send again (``retry`` middleware): the upstream never began processing the request.
    retryable = False
    # The upstream's fault (``circuit_breaker`` counts it): not the client's, not the sidecar's own.
    upstream_fault = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: ErrorHeaders = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        # Its own list, copied from what it is given: a middleware may add to it (retry's
        # x-retry-attempts) without touching the caller's value, which may be shared.
        self.headers: list[tuple[bytes, bytes]] = list(headers)


class InvalidRequest(ProxyError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class MalformedHttp(InvalidRequest):
    """Bad framing: the connection is closed after the answer."""

    code = "malformed_request"


class NotFound(ProxyError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class InvalidApiKey(ProxyError):
    """No API key, or one the sidecar does not know (``auth`` middleware)."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class ModelNotAllowed(ProxyError):
    """The API key is valid but may not use this model (``auth`` middleware)."""

    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class RateLimited(ProxyError):
    """Over a rate limit (``rate_limit`` middleware). ``type`` says which: requests or tokens, as
    OpenAI's own 429s do; ``headers`` carry ``Retry-After``, ``retry-after-ms`` and x-ratelimit-*."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, headers: ErrorHeaders) -> None:
        super().__init__(message, headers=headers)
        self.type = kind


class MethodNotAllowed(ProxyError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(ProxyError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(ProxyError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(ProxyError):
    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class UpstreamError(ProxyError):
    """The upstream could not give an answer."""

    status = 502
    type = "server_error"
    code = "upstream_error"
    upstream_fault = True


class UpstreamConnectError(UpstreamError):
    """Could not connect: the request never reached the upstream (always safe to retry)."""

    code = "upstream_connect_error"
    retryable = True


class UpstreamClosed(UpstreamError):
    """The connection closed or reset before a full response head arrived."""

    code = "upstream_connection_closed"
    # Raised only before a complete response head; once a body streams, its failure goes to the
    # client (an SSE error event), never to a retry.
    retryable = True

    def __init__(self, message: str, *, sent_nothing_new: bool = False) -> None:
        super().__init__(message)
        # True when a *reused* keep-alive connection died before any response byte: the upstream
        # closed it while idle, so the request is re-sent once on a fresh connection.
        self.stale = sent_nothing_new


class UpstreamProtocolError(UpstreamError):
    code = "upstream_protocol_error"


class UpstreamTimeout(ProxyError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"
    upstream_fault = True


class UpstreamConnectTimeout(UpstreamTimeout):
    """Connecting took too long: the request was never sent (safe to retry)."""

    code = "upstream_connect_timeout"
    retryable = True


class UpstreamUnavailable(ProxyError):
    """No connection could be had in time (pool exhausted) or no target can serve."""

    status = 503
    type = "server_error"
    code = "upstream_unavailable"
    retryable = True  # this upstream's pool is saturated or shutting down: another target may serve


class ShuttingDown(ProxyError):
    """The sidecar is stopping and ``drain_timeout_s`` ran out before this response was complete."""

    status = 503
    type = "server_error"
    code = "shutting_down"


class NoHealthyTarget(UpstreamUnavailable):
    """Every target of the route (and of its fallbacks) has its circuit breaker open."""

    retryable = False


class RateLimiterUnavailable(ProxyError):
    """The shared rate-limit store (Redis) cannot be reached and ``on_redis_error: deny``."""

    status = 503
    type = "server_error"
    code = "rate_limiter_unavailable"


def error_body(err: ProxyError) -> bytes:
    return orjson.dumps(
        {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    )


def sse_error_event(exc: BaseException) -> bytes:
    """The SSE event that ends a stream cut short after its head went out: the error in the same
    OpenAI shape as a status answer, which the openai SDK raises as ``APIError`` while iterating."""
    err = exc if isinstance(exc, ProxyError) else internal_error()
    return b"data: " + error_body(err) + b"\n\n"


def internal_error() -> ProxyError:
    return ProxyError("the sidecar failed to handle this request; see its log")
