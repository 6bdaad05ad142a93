"""The HTTP/1.1 front tells HTTP/1.0 from HTTP/1.1 clients right, keep-alive or not (it asks the
parser for the version only when a Connection header could have made an HTTP/1.0 one keep-alive)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.http import Headers, Response
from tests.unit.test_h1_connection import Harness


async def stream() -> AsyncIterator[bytes]:
    yield b"data: 1\n\n"


@pytest.mark.parametrize(
    ("version", "extra", "framing", "connection"),
    [
        (b"1.1", b"", b"transfer-encoding: chunked", None),
        (b"1.1", b"connection: keep-alive\r\n", b"transfer-encoding: chunked", None),
        (b"1.1", b"connection: close\r\n", b"transfer-encoding: chunked", b"close"),
        (b"1.0", b"", None, b"close"),
        (b"1.0", b"connection: keep-alive\r\n", None, b"close"),  # a close-delimited body ends it
        (b"1.0", b"proxy-connection: keep-alive\r\n", None, b"close"),
    ],
)
async def test_a_streamed_answer_is_framed_for_the_client_version(
    version: bytes, extra: bytes, framing: bytes | None, connection: bytes | None
) -> None:
    h = Harness()
    h.responses.append(Response(200, Headers(), stream()))
    await h.feed(b"GET /v1/x HTTP/" + version + b"\r\n" + extra + b"\r\n")
    head = bytes(h.transport.written).split(b"\r\n\r\n", 1)[0].lower()
    assert (b"transfer-encoding: chunked" in head) == (framing is not None), head
    if connection is None:
        assert b"connection:" not in head
    else:
        assert b"connection: " + connection in head


@pytest.mark.parametrize(
    ("version", "extra", "connection"),
    [
        (b"1.1", b"", None),
        (b"1.0", b"", b"close"),
        (b"1.0", b"connection: keep-alive\r\n", b"keep-alive"),
    ],
)
async def test_a_whole_answer_says_keep_alive_only_to_an_http10_client_that_asked(
    version: bytes, extra: bytes, connection: bytes | None
) -> None:
    h = Harness()
    await h.feed(b"GET /v1/x HTTP/" + version + b"\r\n" + extra + b"\r\n")
    head = bytes(h.transport.written).split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 200 ")
    if connection is None:
        assert b"connection:" not in head
    else:
        assert b"connection: " + connection in head
