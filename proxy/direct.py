"""Requests a middleware sends itself, straight to a named upstream's pool: no chain (no auth, rate
limit, cache, retry or breaker), no routing. Shadow traffic and embedding calls use it.

    shadow = ctx.sender("vllm-b")            # at build time: an unknown name is a ValueError there
    response = await shadow.send("POST", "/v1/embeddings", body, [(b"x-tenant", b"t1")])
    data = await read_body(response, 1 << 20)   # or discard_body(response): a body must be consumed

The pool applies what a forwarded request gets: the upstream's ``url`` prefix, its ``api_key``
(replacing any credential given), its connection limits and its timeouts (``connect_timeout_s``,
``first_byte_timeout_s``, ``read_timeout_s``, ``total_timeout_s``), so every await here is bounded.
Errors are the forwarder's: ``proxy.errors`` subclasses (UpstreamConnectError, UpstreamTimeout…).

A sender holds the pool of the build that made it; a reload that changes or removes the upstream
closes that pool once the old build's last client response is complete, and a send still running
then fails with the pool's error. Send from the middleware that the current build made.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from proxy.clock import Clock
from proxy.http import Headers, Request, RequestContext, Response
from proxy.upstream.base import Upstream

_JSON = (b"content-type", b"application/json")


class BodyTooLarge(Exception):
    """A response body longer than the reader's ``max_bytes`` (the rest was not read)."""


class UpstreamSender:
    """Sends requests to one upstream's pool (see the module docstring)."""

    __slots__ = ("_clock", "_ids", "_pool", "upstream")

    def __init__(self, upstream: str, pool: Upstream, clock: Clock) -> None:
        self.upstream = upstream
        self._pool = pool
        self._clock = clock
        self._ids = 0

    async def send(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Iterable[tuple[bytes, bytes]] = (),
        request_id: bytes | None = None,
    ) -> Response:
        """Send ``method path`` (``path`` with its query, e.g. ``/v1/embeddings``) with ``body``;
        return once the response head is in. ``headers``: lower-case names; a body without a
        ``content-type`` is sent as JSON. ``request_id``: the ``x-request-id`` to send (e.g. the
        client request's, so a shadow call can be matched with it); else one of ours."""
        if not path.startswith("/"):
            raise ValueError(f"path must start with '/', got {path!r}")
        sent = Headers.of(headers)
        if body and sent.get(b"content-type") is None:
            sent.append(_JSON)
        if request_id is None:
            self._ids += 1
            request_id = b"sidecar-%s-%d" % (self.upstream.encode(), self._ids)
        sent.set(b"x-request-id", request_id)
        ctx = RequestContext(request_id, "sidecar", self._clock.now())
        return await self._pool.send(Request(method, path.encode(), sent, body, ctx), body)


class Senders:
    """The pools of one build, by upstream name: what ``BuildContext.sender`` hands out."""

    def __init__(self, pools: Mapping[str, Upstream], clock: Clock) -> None:
        self._pools = pools
        self._clock = clock

    def get(self, upstream: str) -> UpstreamSender:
        pool = self._pools.get(upstream)
        if pool is None:
            known = ", ".join(sorted(self._pools)) or "none"
            raise ValueError(f"unknown upstream {upstream!r}; known: {known}")
        return UpstreamSender(upstream, pool, self._clock)


async def read_body(response: Response, max_bytes: int) -> bytes:
    """The whole body of ``response``, at most ``max_bytes`` (BodyTooLarge beyond: the rest is
    dropped and the connection not reused). The pool's read and total timeouts bound the wait."""
    body = response.body
    if isinstance(body, bytes):
        if len(body) > max_bytes:
            raise BodyTooLarge(f"response body of {len(body)} bytes, more than {max_bytes}")
        return body
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in body:
            size += len(chunk)
            if size > max_bytes:
                raise BodyTooLarge(f"response body longer than {max_bytes} bytes")
            chunks.append(chunk)
    except BaseException:
        abort = getattr(body, "abort", None)
        if abort is not None:
            abort()
        raise
    return b"".join(chunks)
