"""The seam between the forwarder and a protocol-specific upstream pool."""

from __future__ import annotations

from typing import Protocol

from proxy.http import Headers, Request, Response

# Response headers that never pass through: hop-by-hop, framing (the front recomputes it), the
# request id (the front sets the client's own) and ``server`` (what software the backend runs is
# not the client's business).
RESPONSE_DROP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
        b"x-request-id",
        b"server",
    }
)


class Upstream(Protocol):
    """A pool of connections to one upstream."""

    name: str

    async def send(self, request: Request, body: bytes) -> Response:
        """Send ``request`` with ``body`` (already rewritten for this upstream); return once the
        response head is in. The body of the returned Response is bytes when the whole response
        had arrived by then, else a PipeableBody that streams the rest."""
        ...

    def stats(self) -> dict[str, int]: ...

    async def close(self) -> None: ...


def request_drop_set(has_api_key: bool) -> frozenset[bytes]:
    """Request headers not forwarded: hop-by-hop, framing, host, and the client's credential when
    the upstream has a key of its own."""
    drop = {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
        b"host",
        b"content-length",
        b"expect",
    }
    if has_api_key:
        drop |= {b"authorization", b"api-key"}
    return frozenset(drop)


def connection_tokens(headers: Headers) -> frozenset[bytes]:
    """Header names listed in ``Connection:`` (also hop-by-hop, RFC 9110 §7.6.1)."""
    value = headers.get(b"connection")
    if value is None:
        return frozenset()
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())
