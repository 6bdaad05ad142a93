"""The test fault proxy (tests/fault_proxy.py) in front of the mock backend: each mode, the counters,
and a seeded ``reset_ratio`` whose reset requests never reach the backend."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.fault_proxy import FaultProxy
from tests.integration.mock_proc import MockProcess

CHAT = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(autouse=True)
def _fresh_mock(mock: MockProcess) -> None:
    mock.reset()


@pytest.fixture
def fp(mock: MockProcess) -> Iterator[FaultProxy]:
    with FaultProxy(("127.0.0.1", mock.port)) as proxy:
        yield proxy


class RawClient:
    """HTTP/1.1 keep-alive over a plain socket: one ``sendall`` per request, so one proxy chunk."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None

    def connect(self) -> socket.socket:
        if self.sock is None:
            self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout)
        return self.sock

    def request(self, method: str = "GET", path: str = "/v1/models", body: bytes = b"") -> tuple[int, bytes]:
        """Status and body; an ``OSError`` (reset, EOF, timeout) closes the socket and propagates."""
        sock = self.connect()
        head = f"{method} {path} HTTP/1.1\r\nHost: mock\r\nContent-Type: application/json\r\n"
        try:
            sock.sendall(head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            return read_response(sock)
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get_status(port: int, timeout: float = 5.0) -> int:
    """GET /v1/models on a connection of its own."""
    with RawClient(port, timeout) as client:
        return client.request()[0]


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        data += recv(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(v) for k, _, v in (h.partition(":") for h in lines[1:]) if k.lower() == "content-length"
    )
    while len(body) < length:
        body += recv(sock)
    return int(lines[0].split()[1]), body


def recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(65536)
    if not chunk:
        raise ConnectionAbortedError("EOF")
    return chunk


def assert_reset_on_connect(port: int) -> None:
    """A new connection is answered with a TCP RST (not a FIN, not silence): the reset can surface
    in ``connect`` itself (the socket has a timeout, so it connects without blocking), in a send or
    in a receive."""
    with pytest.raises(ConnectionResetError), socket.create_connection(("127.0.0.1", port), 5) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: mock\r\n\r\n")
        time.sleep(0.05)
        sock.recv(1024)


# ---- modes ----------------------------------------------------------------------------------------


def test_pass_forwards_both_ways_and_counts(fp: FaultProxy, mock: MockProcess) -> None:
    assert fp.url == f"http://127.0.0.1:{fp.port}" and fp.port != mock.port
    with RawClient(fp.port) as client:
        assert client.request()[0] == 200
        status, body = client.request("POST", "/v1/chat/completions", CHAT)
    assert status == 200 and orjson.loads(body)["choices"][0]["message"]["content"].startswith("Hello")
    stream = {**orjson.loads(CHAT), "stream": True}
    with (
        httpx.Client(base_url=fp.url + "/v1", timeout=5) as http,  # a stream, through httpx
        http.stream("POST", "/chat/completions", json=stream) as r,
    ):
        assert r.read().endswith(b"data: [DONE]\n\n")
    assert mock.stats()["completed"] == 3
    stats = fp.stats()
    assert (stats["connections"], stats["upstream_connects"], stats["resets"]) == (2, 2, 0)
    assert stats["requests"] >= 3 and stats["forwarded"] == stats["requests"]  # httpx may write twice


def test_reset_mode_resets_new_and_open_connections_before_forwarding(
    fp: FaultProxy, mock: MockProcess
) -> None:
    with RawClient(fp.port) as client:
        assert client.request()[0] == 200
        fp.set(mode="reset")
        with pytest.raises(ConnectionResetError):
            client.request("POST", "/v1/chat/completions", CHAT)  # an open connection
    assert_reset_on_connect(fp.port)  # a new one
    fp.set(mode="pass")
    assert get_status(fp.port) == 200
    stats = fp.stats()
    assert (stats["connections"], stats["resets"], stats["forwarded"]) == (3, 2, 2)
    assert mock.stats()["requests"] == 2


def test_refuse_closes_the_port_and_pass_listens_again_on_it(fp: FaultProxy, mock: MockProcess) -> None:
    port = fp.port
    with RawClient(port) as open_client:
        assert open_client.request()[0] == 200
        fp.set(mode="refuse")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        with pytest.raises(OSError):  # the open connection was reset, like a dead process's
            open_client.request()
    fp.set(mode="pass")
    assert fp.port == port and get_status(port) == 200
    stats = fp.stats()
    assert (stats["connections"], stats["resets"]) == (2, 1)
    assert mock.stats()["requests"] == 2


def test_blackhole_reads_and_never_answers(fp: FaultProxy, mock: MockProcess) -> None:
    with RawClient(fp.port) as open_client:
        assert open_client.request()[0] == 200
        open_client.connect().settimeout(0.3)
        fp.set(mode="blackhole")
        with pytest.raises(TimeoutError):
            get_status(fp.port, timeout=0.3)
        with pytest.raises(TimeoutError):
            open_client.request("POST", "/v1/chat/completions", CHAT)
    stats = fp.stats()
    assert (stats["connections"], stats["requests"], stats["forwarded"], stats["resets"]) == (2, 3, 1, 0)
    assert mock.stats()["requests"] == 1


def test_delay_holds_each_upstream_chunk(fp: FaultProxy) -> None:
    fp.set(mode="delay", delay_s=0.3)
    started = time.monotonic()
    assert get_status(fp.port) == 200
    assert time.monotonic() - started >= 0.25


def test_drip_sends_small_pieces_with_gaps(fp: FaultProxy, mock: MockProcess) -> None:
    with RawClient(mock.port) as direct_client:
        direct = direct_client.request()[1]
    fp.set(mode="drip", drip_bytes=40, drip_gap_s=0.03)
    with RawClient(fp.port) as client:
        sock = client.connect()
        started = time.monotonic()
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: mock\r\n\r\n")
        pieces = [recv(sock)]
        while not b"".join(pieces).endswith(direct):
            pieces.append(recv(sock))
        elapsed = time.monotonic() - started
    total = len(b"".join(pieces))
    assert len(pieces) >= 2 and min(len(p) for p in pieces) <= 40
    assert elapsed >= 0.9 * 0.03 * (total // 40 - 1)


def test_truncate_forwards_the_first_bytes_then_closes(fp: FaultProxy, mock: MockProcess) -> None:
    fp.set(mode="truncate", truncate_bytes=20)
    with socket.create_connection(("127.0.0.1", fp.port), timeout=5) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: mock\r\n\r\n")
        got = b""
        while chunk := sock.recv(1024):  # ends with a clean EOF, not a reset
            got += chunk
    assert got == b"HTTP/1.1 200 OK\r\nCon"
    stats = fp.stats()
    assert (stats["truncated"], stats["forwarded"], stats["resets"]) == (1, 1, 0)
    assert mock.stats()["requests"] == 1


def test_client_leaving_mid_stream_is_seen_upstream(fp: FaultProxy, mock: MockProcess) -> None:
    stream = {**orjson.loads(CHAT), "stream": True}
    slow = {"x-mock-chunks": "1000", "x-mock-delay-ms": "20"}
    with (
        httpx.Client(base_url=fp.url + "/v1", timeout=5) as http,
        http.stream("POST", "/chat/completions", json=stream, headers=slow) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
    stats = mock.wait_stats(lambda s: s["disconnects"] == 1)
    assert stats["completed"] == 0 and stats["in_flight"] == 0
    deadline = time.monotonic() + 5
    while fp.stats()["open"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fp.stats()["open"] == 0


def test_upstream_down_resets_the_client() -> None:
    with socket.socket() as spare:
        spare.bind(("127.0.0.1", 0))
        dead_port = spare.getsockname()[1]  # bound, never listening: connects are refused
        with FaultProxy(("127.0.0.1", dead_port)) as proxy:
            with pytest.raises(ConnectionResetError):
                get_status(proxy.port)
            assert proxy.stats()["upstream_errors"] == 1


# ---- reset_ratio ----------------------------------------------------------------------------------


def _outcomes(fp: FaultProxy, n: int) -> list[bool]:
    """``n`` chat completions on keep-alive connections: True where answered, False where reset."""
    out = []
    with RawClient(fp.port) as client:
        for i in range(n):
            body = CHAT.replace(b'"hi"', b'"%d"' % i)
            try:
                out.append(client.request("POST", "/v1/chat/completions", body)[0] == 200)
            except ConnectionResetError:
                out.append(False)
    return out


def test_reset_ratio_resets_a_seeded_share_that_never_reaches_the_backend(
    fp: FaultProxy, mock: MockProcess
) -> None:
    fp.set(reset_ratio=0.1, seed=7)
    first = _outcomes(fp, 300)
    resets = first.count(False)
    assert 12 <= resets <= 55  # 30 expected; binomial sd 5.2
    stats = fp.stats()
    assert (stats["requests"], stats["resets"], stats["forwarded"]) == (300, resets, 300 - resets)
    assert stats["connections"] == resets + 1  # each reset ends a connection; the client reconnects
    mock_stats = mock.wait_stats(lambda s: s["in_flight"] == 0)
    assert mock_stats["requests"] == mock_stats["completed"] == 300 - resets
    fp.set(seed=7)
    assert _outcomes(fp, 300) == first  # the same seed, the same requests reset
    fp.set(reset_ratio=0.0)
    assert all(_outcomes(fp, 20))


# ---- control and clean-up ---------------------------------------------------------------------------


def test_bad_settings_are_rejected(fp: FaultProxy) -> None:
    with pytest.raises(ValueError, match="mode"):
        fp.set(mode="explode")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reset_ratio"):
        fp.set(reset_ratio=1.5)
    assert fp.settings.mode == "pass"


def test_stop_closes_every_socket_and_the_thread(mock: MockProcess) -> None:
    threads = threading.active_count()
    proxy = FaultProxy(("127.0.0.1", mock.port)).start()
    port = proxy.port
    with RawClient(port, timeout=2) as client, RawClient(port, timeout=2) as idle:
        assert client.request()[0] == 200
        idle.connect()
        deadline = time.monotonic() + 5
        while proxy.stats()["open"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # accepted, not only queued in the listen backlog
        proxy.stop()
        assert threading.active_count() == threads
        with pytest.raises(OSError):
            client.request()  # the open connection was closed
        assert idle.connect().recv(10) == b""
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    proxy.stop()  # a second stop is a no-op
    with pytest.raises(RuntimeError, match="not started"):
        proxy.stats()
