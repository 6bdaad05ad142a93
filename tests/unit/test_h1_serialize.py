"""proxy.upstream.pool.H1Pool._serialize: the request head the upstream receives."""

from __future__ import annotations

import asyncio

from proxy.config import UpstreamConfig
from proxy.http import Headers, Request, RequestContext
from proxy.upstream.pool import H1Pool


def serialize(method: str, headers: list[tuple[bytes, bytes]], body: bytes, api_key: str = "") -> bytes:
    loop = asyncio.new_event_loop()
    try:
        pool = H1Pool("up", UpstreamConfig(url="http://127.0.0.1:9/base", api_key=api_key), loop)
        request = Request(method, b"/v1/chat?x=1", Headers(headers), body, RequestContext(b"r1", "c", 0.0))
        return pool._serialize(request, body)
    finally:
        loop.close()


def test_a_post_has_its_headers_then_its_length_then_the_body() -> None:
    headers = [(b"host", b"client"), (b"content-type", b"application/json"), (b"content-length", b"2")]
    assert serialize("POST", headers, b"{}") == (
        b"POST /base/v1/chat?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\n"
        b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
    )


def test_a_get_without_body_ends_with_the_empty_line() -> None:
    assert serialize("GET", [(b"accept", b"*/*")], b"") == (
        b"GET /base/v1/chat?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\naccept: */*\r\n\r\n"
    )


def test_names_listed_in_connection_are_dropped_wherever_they_stand() -> None:
    headers = [
        (b"x-hop", b"1"),
        (b"x-keep", b"2"),
        (b"connection", b"keep-alive, X-Hop"),
        (b"x-hop", b"3"),
        (b"te", b"trailers"),
    ]
    assert serialize("GET", headers, b"") == (
        b"GET /base/v1/chat?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\nx-keep: 2\r\n\r\n"
    )


def test_the_upstream_key_replaces_the_client_credential() -> None:
    headers = [(b"authorization", b"Bearer client"), (b"x-a", b"b")]
    assert serialize("POST", headers, b"", api_key="up-key") == (
        b"POST /base/v1/chat?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\nauthorization: Bearer up-key\r\n"
        b"x-a: b\r\ncontent-length: 0\r\n\r\n"
    )
