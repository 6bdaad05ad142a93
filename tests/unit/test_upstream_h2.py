"""HTTP/2 upstream pieces without sockets: the protocol key, the pool chosen for it, the request
headers, and the body's flow control (the window goes back only as the consumer takes data)."""

from __future__ import annotations

import asyncio
import textwrap

import pytest

from proxy.config import UpstreamConfig
from proxy.config_loader import ConfigError, load_config_text
from proxy.http import Headers, Request, RequestContext
from proxy.upstream.factory import AlpnPool, make_upstream
from proxy.upstream.h2_body import H2Body
from proxy.upstream.h2_pool import H2Pool
from proxy.upstream.pool import H1Pool

CONFIG = """\
upstreams:
  up: {{url: "{url}", protocol: {protocol}}}
routes:
  - {{model: m, targets: [{{upstream: up, model: m}}]}}
"""


@pytest.mark.parametrize(
    ("url", "protocol", "problem"),
    [
        ("https://x", "h2c", "upstreams.up.protocol: h2c is HTTP/2 without TLS"),
        ("http://x", "h2", "upstreams.up.protocol: h2 is HTTP/2 over TLS"),
        ("http://x", "h3", "upstreams.up.protocol: must be one of"),
    ],
)
def test_protocol_must_fit_the_url(url: str, protocol: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_text(CONFIG.format(url=url, protocol=protocol), "c.yaml", {})
    assert any(problem in p for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    ("url", "protocol", "kind"),
    [
        ("http://x", "auto", H1Pool),
        ("http://x", "http1", H1Pool),
        ("https://x", "http1", H1Pool),
        ("http://x", "h2c", H2Pool),
        ("https://x", "h2", H2Pool),
        ("https://x", "auto", AlpnPool),
    ],
)
async def test_the_pool_follows_the_protocol(url: str, protocol: str, kind: type) -> None:
    config = load_config_text(CONFIG.format(url=url, protocol=protocol), "c.yaml", {})
    pool = make_upstream("up", config.upstreams["up"], asyncio.get_running_loop())
    assert type(pool) is kind


async def test_request_headers_are_http2_clean() -> None:
    cfg = UpstreamConfig(url="http://10.0.0.5:8000/openai", protocol="h2c", api_key="k")
    pool = H2Pool("up", cfg, asyncio.get_running_loop())
    headers = Headers(
        [
            (b"host", b"sidecar"),
            (b"connection", b"keep-alive, x-hop"),
            (b"x-hop", b"1"),
            (b"keep-alive", b"5"),
            (b"te", b"trailers"),
            (b"transfer-encoding", b"chunked"),
            (b"upgrade", b"h2c"),
            (b"authorization", b"Bearer client"),
            (b"x-request-id", b"rid"),
            (b"content-type", b"application/json"),
        ]
    )
    request = Request("POST", b"/v1/chat/completions?x=1", headers, b"{}", RequestContext(b"rid", "c", 0))
    assert pool._headers(request, b"{}") == [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"10.0.0.5:8000"),
        (b":path", b"/openai/v1/chat/completions?x=1"),
        (b"authorization", b"Bearer k"),
        (b"x-request-id", b"rid"),
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
    ]


class FakeConn:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.acked = 0
        self.cancelled: list[int] = []

    def acknowledge(self, sid: int, flow: int) -> None:
        self.acked += flow

    def flush_soon(self) -> None:
        pass

    def cancel_stream(self, sid: int) -> None:
        self.cancelled.append(sid)


class Sink:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.done: BaseException | bool = False

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def finish(self) -> None:
        self.done = True

    def fail(self, exc: BaseException) -> None:
        self.done = exc


async def test_piped_body_acknowledges_only_what_the_sink_takes() -> None:
    conn = FakeConn()
    body = H2Body(conn, 1, None)  # type: ignore[arg-type]
    body.feed(b"early", 5)
    assert conn.acked == 0  # nobody took it yet
    sink = Sink()
    body.pipe(sink)
    assert sink.data == [b"early"] and conn.acked == 5
    body.pause_producing()  # the client is slow
    body.feed(b"a" * 100, 100)
    body.feed(b"b" * 100, 100)
    body.end(None)
    assert conn.acked == 5 and sink.data == [b"early"] and sink.done is False
    body.resume_producing()
    assert conn.acked == 205 and b"".join(sink.data) == b"early" + b"a" * 100 + b"b" * 100
    assert sink.done is True


async def test_iterated_body_acknowledges_per_chunk_taken_and_abort_resets() -> None:
    conn = FakeConn()
    body = H2Body(conn, 3, None)  # type: ignore[arg-type]
    body.feed(b"x", 10)  # padded: the flow-controlled length counts
    body.feed(b"", 4)
    assert await body.__anext__() == b"x" and conn.acked == 10
    body.feed(b"y", 1)
    body.end(None)
    assert [c async for c in body] == [b"y"] and conn.acked == 15
    other = H2Body(conn, 5, None)  # type: ignore[arg-type]
    other.abort()
    assert conn.cancelled == [5]
    with pytest.raises(asyncio.CancelledError):
        await other.__anext__()


def test_protocol_default_is_auto() -> None:
    config = load_config_text(textwrap.dedent(CONFIG.format(url="http://x", protocol="auto")), "c.yaml", {})
    assert UpstreamConfig(url="http://x").protocol == "auto" == config.upstreams["up"].protocol
