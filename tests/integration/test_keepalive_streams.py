"""Streamed responses one after another on one connection, through the real sidecar and the mock:
each must end (chunk terminator on HTTP/1.1, END_STREAM on h2c) before the next is sent, within
a second. A response whose end was lost used to hang the client until the keep-alive timeout."""

from __future__ import annotations

import socket
import time

import orjson

from tests.h1_response import H1Response
from tests.integration.h2_raw import RawH2
from tests.integration.sidecar_proc import SidecarProcess

CHAT = orjson.dumps({"model": "demo-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]})


def test_1000_streams_one_after_another_on_one_http1_socket(sidecar: SidecarProcess) -> None:
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: sidecar\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%b" % (len(CHAT), CHAT)
    )
    with socket.create_connection((sidecar.host, sidecar.port), timeout=1.0) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        framings: set[bytes] = set()
        for i in range(1000):
            sock.sendall(request)
            response = H1Response()
            started = time.monotonic()
            while not response.done:
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    raise AssertionError(
                        f"response {i} did not end within 1 s; got {bytes(response.body[-120:])!r}"
                    ) from None
                assert data, f"the sidecar closed the connection during response {i}"
                response.feed(data)
            assert time.monotonic() - started < 1.0, f"response {i} took over a second"
            assert response.status == 200, (i, bytes(response.body))
            assert response.body.endswith(b"data: [DONE]\n\n"), (i, bytes(response.body[-120:]))
            framings.add(b"chunked" if b"transfer-encoding" in response.headers else b"length")
        # The upstream streams chunked: so does the sidecar, however the upstream's reads fell.
        assert framings == {b"chunked"}


def test_300_streams_one_after_another_on_one_h2c_connection(sidecar: SidecarProcess) -> None:
    with RawH2(sidecar.host, sidecar.port, timeout=1.0) as client:
        for i in range(300):
            started = time.monotonic()
            sid = client.request("POST", "/v1/chat/completions", CHAT)
            try:
                status, _, body = client.response(sid, timeout=1.0)
            except TimeoutError:
                raise AssertionError(f"stream {i} (id {sid}) did not end within 1 s") from None
            assert time.monotonic() - started < 1.0, f"stream {i} took over a second"
            assert status == 200 and body.endswith(b"data: [DONE]\n\n"), (i, status, body[-120:])
