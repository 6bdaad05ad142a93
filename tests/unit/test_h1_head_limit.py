"""The HTTP/1.1 front's max_header_bytes, however the head is split into reads (on_header counts
nothing itself: see proxy.server.h1.H1Connection.on_header)."""

from __future__ import annotations

from proxy.config import LimitsConfig
from tests.unit.test_h1_connection import Harness

LIMIT = 1024


def head(header_bytes: int) -> bytes:
    """A GET whose one extra header line is ``header_bytes`` long (name, colon, value)."""
    return b"GET /v1/models HTTP/1.1\r\nx-a: " + b"a" * (header_bytes - 5) + b"\r\n\r\n"


async def test_a_head_over_the_limit_in_one_read_is_refused() -> None:
    h = Harness(LimitsConfig(max_header_bytes=LIMIT))
    await h.feed(head(LIMIT + 100))
    assert h.transport.written.startswith(b"HTTP/1.1 431 ") and not h.requests


async def test_a_head_over_the_limit_in_small_reads_is_refused_when_complete() -> None:
    # 1100 bytes in reads of 500: the reads after the first (600 bytes) stay under the limit of
    # unfinished heads; the complete head is counted and refused.
    h = Harness(LimitsConfig(max_header_bytes=LIMIT))
    data = head(1100 - 30)
    await h.feed(*(data[i : i + 500] for i in range(0, len(data), 500)))
    assert h.transport.written.startswith(b"HTTP/1.1 431 ") and not h.requests


async def test_many_headers_over_the_limit_in_one_read_are_refused() -> None:
    h = Harness(LimitsConfig(max_header_bytes=LIMIT))
    many = b"GET /v1/models HTTP/1.1\r\n" + b"".join(b"x-%d: %s\r\n" % (i, b"v" * 40) for i in range(30))
    await h.feed(many + b"\r\n")
    assert h.transport.written.startswith(b"HTTP/1.1 431 ") and not h.requests


async def test_a_head_within_the_limit_in_a_read_larger_than_it_is_served() -> None:
    h = Harness(LimitsConfig(max_header_bytes=LIMIT, max_body_bytes=10_000))
    body = b"x" * 5000
    request = b"POST /v1/x HTTP/1.1\r\ncontent-length: %d\r\nx-a: %s\r\n\r\n" % (len(body), b"a" * 900)
    await h.feed(request + body)
    assert h.transport.written.startswith(b"HTTP/1.1 200 ") and h.requests[0].body == body


async def test_a_head_exactly_at_the_limit_spread_over_reads_is_served() -> None:
    h = Harness(LimitsConfig(max_header_bytes=LIMIT))
    # counted: url (10) + name + value + 4 per header = exactly LIMIT
    url = b"/v1/models"
    value = b"a" * (LIMIT - len(url) - 4 - 3)
    data = b"GET " + url + b" HTTP/1.1\r\nx-a: " + value + b"\r\n\r\n"
    await h.feed(*(data[i : i + 100] for i in range(0, len(data), 100)))
    assert h.transport.written.startswith(b"HTTP/1.1 200 ") and len(h.requests) == 1
