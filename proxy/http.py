"""Protocol-agnostic request and response types shared by the fronts, the chain and the upstreams.

Header names are lower-case ``bytes`` and values ``bytes``: both HTTP parsers (httptools, h2) hand
us bytes and we write bytes, so the hot path never encodes or decodes a header it does not read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any, Protocol

import orjson

from proxy.errors import InvalidRequest

# Hop-by-hop headers (RFC 9110 §7.6.1) plus framing headers that each side computes for itself.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    }
)


class Headers(list[tuple[bytes, bytes]]):
    """An ordered multi-map of (lower-case name, value). A plain list, so iteration stays cheap."""

    __slots__ = ()

    def get(self, name: bytes, default: bytes | None = None) -> bytes | None:
        for k, v in self:
            if k == name:
                return v
        return default

    def get_all(self, name: bytes) -> list[bytes]:
        return [v for k, v in self if k == name]

    def remove(self, name: bytes) -> None:  # type: ignore[override]
        """Drop every header called ``name`` (unlike list.remove, which drops one element)."""
        self[:] = [(k, v) for k, v in self if k != name]

    def set(self, name: bytes, value: bytes) -> None:
        self.remove(name)
        self.append((name, value))

    def add(self, name: bytes, value: bytes) -> None:
        self.append((name, value))

    @classmethod
    def of(cls, items: Iterable[tuple[bytes, bytes]]) -> Headers:
        return cls((k.lower(), v) for k, v in items)


class RequestContext:
    """Per-request state that middleware read and write. Nothing per request lives anywhere else."""

    __slots__ = (
        "_extra",
        "attempt",
        "body_in",
        "build",
        "client",
        "disconnected",
        "identity",
        "request_id",
        "started",
        "target",
        "tenant",
        "tried",
        "upstream_at",
        "upstream_s",
    )

    def __init__(self, request_id: bytes, client: str, started: float) -> None:
        self.request_id = request_id
        self.client = client  # "host:port" of the peer
        self.started = started  # clock time the request was complete
        # The client's body as it came (set by the driver; a middleware may rewrite request.body).
        self.body_in = b""
        self.identity: str | None = None  # API key id, set by auth
        self.tenant: str | None = None  # tenant id, set by auth
        self.target: Any = None  # proxy.routing.Target chosen for this attempt (canary/retry may set it)
        self.attempt = 0  # retries so far (``retry`` middleware)
        self.tried: tuple[Any, ...] = ()  # targets of earlier attempts, which failover avoids
        self.disconnected = False  # set by the front when the client goes away
        # Set by the forwarder: time spent in upstream sends (to the response head, every attempt),
        # and when the last one returned (-1: none yet). What is left of the duration is the sidecar's.
        self.upstream_s = 0.0
        self.upstream_at = -1.0
        self.build: Any = None  # the proxy.server.driver.Generation serving it, until it is done
        self._extra: dict[str, Any] | None = None

    @property
    def extra(self) -> dict[str, Any]:
        """Free space for user middleware (made on first use: most requests never touch it)."""
        extra = self._extra
        if extra is None:
            extra = self._extra = {}
        return extra


class Request:
    """A complete client request. The body is small JSON (capped by limits.max_body_bytes)."""

    __slots__ = ("_json", "body", "ctx", "headers", "method", "model_read", "path", "query", "raw_target")

    def __init__(
        self,
        method: str,
        raw_target: bytes,
        headers: Headers,
        body: bytes,
        ctx: RequestContext,
    ) -> None:
        self.method = method
        self.raw_target = raw_target  # path + query exactly as the client sent it
        q = raw_target.find(b"?")
        if q < 0:
            self.path = raw_target.decode("latin-1")
            self.query = ""
        else:
            self.path = raw_target[:q].decode("latin-1")
            self.query = raw_target[q + 1 :].decode("latin-1")
        self.headers = headers
        self.body = body
        self.ctx = ctx
        self._json: Any = _UNPARSED
        # proxy.requested_model.read_model's answer and the body it read (valid while that is
        # still ``body``: a middleware that replaces the body invalidates it by doing so)
        self.model_read: tuple[bytes, Any] | None = None

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)

    def json(self) -> Any:
        """The body parsed as JSON, once. Raises InvalidRequest (400) when it is not JSON."""
        if self._json is _UNPARSED:
            try:
                self._json = orjson.loads(self.body)
            except orjson.JSONDecodeError as e:
                raise InvalidRequest(f"request body is not valid JSON: {e}") from None
        return self._json

    def set_json(self, value: Any) -> None:
        """Replace the body with ``value`` serialized (used by the model rewrite and middleware)."""
        self._json = value
        self.body = orjson.dumps(value)


_UNPARSED: Any = object()


class Response:
    """Status, headers and a body not yet sent: ``bytes``, or an async iterator of ``bytes``.

    Only the front writes to the client, so a middleware may replace a response until the front
    has it. A middleware that changes the length of a streamed body must drop ``content-length``.
    A response owns its headers: it keeps a copy of what it is given, so a list shared by several
    responses (or a module's constant) is never changed through one of them.
    """

    __slots__ = ("body", "headers", "status")

    def __init__(
        self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes | AsyncIterator[bytes]
    ) -> None:
        self.status = status
        self.headers = Headers(headers)
        self.body = body

    @classmethod
    def json(cls, status: int, payload: Any, headers: Iterable[tuple[bytes, bytes]] = ()) -> Response:
        response = cls(status, headers, orjson.dumps(payload))
        response.headers.append((b"content-type", b"application/json"))
        return response


class BodySink(Protocol):
    """Where a pipeable body pushes its chunks (a front's connection or stream)."""

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def fail(self, exc: BaseException) -> None: ...


class PipeableBody(Protocol):
    """A streamed body the front may pipe straight into its transport, callbacks only.

    ``pipe`` replays what was buffered, then pushes each chunk as it arrives. The front calls
    ``pause_producing`` / ``resume_producing`` for backpressure and ``abort`` when the client left.
    It is also an async iterator, for middleware that wrap it. A front pipes any body that has
    ``pipe`` and frames it by its optional ``length`` attribute (Content-Length, else chunked).
    """

    def pipe(self, sink: BodySink) -> None: ...

    def pause_producing(self) -> None: ...

    def resume_producing(self) -> None: ...

    def abort(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def __anext__(self) -> bytes: ...
