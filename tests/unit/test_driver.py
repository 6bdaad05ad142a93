"""proxy.server.driver.RequestDriver: what both fronts share, driven without sockets."""

from __future__ import annotations

import asyncio
from typing import cast

import orjson
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection as H2Client
from h2.exceptions import NoSuchStreamError, ProtocolError, StreamClosedError

from proxy.chain import Handler
from proxy.clock import FakeClock
from proxy.config import Http2Config, LimitsConfig
from proxy.http import Headers, Request, Response
from proxy.server.driver import RequestDriver
from proxy.server.front import Front
from proxy.server.h1 import H1Connection
from proxy.server.h2 import H2Connection, describe
from tests.fake_transport import FakeTransport


async def _ok(request: Request) -> Response:
    return Response(200, Headers(), b"ok")


def _driver(handler: Handler = _ok) -> RequestDriver:
    return RequestDriver(handler, LimitsConfig(), FakeClock(5000.0))


async def test_both_fronts_time_a_request_by_the_injected_clock() -> None:
    """ctx.started comes from the clock the access log and the breakers read, on either front."""
    seen: list[Request] = []

    async def handler(request: Request) -> Response:
        seen.append(request)
        return Response(200, Headers(), b"ok")

    loop = asyncio.get_running_loop()
    clock = FakeClock(12345.0)
    front = Front(handler, LimitsConfig(), clock, loop, 10)
    h1 = H1Connection(front)
    h1.connection_made(cast(asyncio.Transport, FakeTransport()))
    h1.data_received(b"POST /v1/x HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}")
    h2 = H2Connection(front, Http2Config())
    h2.connection_made(cast(asyncio.Transport, FakeTransport()))
    c = H2Client(H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    c.send_headers(
        1, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/v1/y")]
    )
    c.end_stream(1)
    h2.data_received(c.data_to_send())
    for _ in range(5):
        await asyncio.sleep(0)
    assert [r.path for r in seen] == ["/v1/x", "/v1/y"]
    assert [r.ctx.started for r in seen] == [12345.0, 12345.0]


async def test_a_cancellation_raised_inside_the_chain_is_a_500() -> None:
    async def cancels(request: Request) -> Response:
        raise asyncio.CancelledError

    driver = _driver(cancels)
    request = driver.request("POST", b"/v1/x", Headers(), b"{}", "peer", None)
    response = await driver.respond(request)
    assert response.status == 500
    assert isinstance(response.body, bytes)
    assert orjson.loads(response.body)["error"]["type"] == "server_error"


async def test_the_client_leaving_still_cancels() -> None:
    started = asyncio.Event()

    async def waits(request: Request) -> Response:
        started.set()
        await asyncio.sleep(60)
        raise AssertionError("not reached")

    driver = _driver(waits)
    request = driver.request("POST", b"/v1/x", Headers(), b"{}", "peer", None)
    task = asyncio.ensure_future(driver.respond(request))
    await started.wait()
    task.cancel()  # what a front does when its client goes away
    with pytest.raises(asyncio.CancelledError):
        await task


def test_request_ids_kept_replaced_or_made() -> None:
    driver = _driver()
    headers = Headers([(b"x-request-id", b"abc")])
    assert driver.request("GET", b"/", headers, b"", "p", b"abc").ctx.request_id == b"abc"
    long_id = b"r" * 201
    headers = Headers([(b"x-request-id", long_id)])
    request = driver.request("GET", b"/", headers, b"", "p", long_id)
    assert request.ctx.request_id != long_id and headers.get_all(b"x-request-id") == [request.ctx.request_id]
    headers = Headers()
    request = driver.request("GET", b"/", headers, b"", "p", None)
    assert headers.get_all(b"x-request-id") == [request.ctx.request_id]


def test_healthz_is_answered_to_get_and_head_only() -> None:
    driver = _driver()
    for method, local in (("GET", True), ("HEAD", True), ("POST", False)):
        request = driver.request(method, b"/healthz", Headers(), b"", "p", None)
        assert (driver.local_answer(request) is not None) is local, method


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (StreamClosedError(7), ["stream 7", "closed"]),
        (NoSuchStreamError(9), ["stream 9", "does not exist"]),
        (ProtocolError("Invalid input"), ["Invalid input", "ProtocolError"]),
    ],
)
def test_protocol_errors_are_logged_by_what_was_wrong(error: ProtocolError, words: list[str]) -> None:
    text = describe(error)
    assert all(w in text for w in words), text
    assert text != str(error)
