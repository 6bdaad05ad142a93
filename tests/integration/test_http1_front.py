"""The HTTP/1.1 front, byte by byte: raw sockets against a real sidecar in front of the real mock.

Every socket has a timeout, so a test that would hang fails instead. Three sidecars serve the
module: ``sidecar`` (conftest: default limits), ``tight`` (small limits and timeouts) and ``aux``
(several upstreams: one with its own API key, an impatient one, a dead one, one behind a relay
that can play a stale keep-alive connection, and a spare mock that a test restarts).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config

TIMEOUT_S = 5.0
HI = [{"role": "user", "content": "hi"}]
TIGHT_LIMITS = (
    "limits: {max_header_bytes: 1024, max_body_bytes: 1000, header_timeout_s: 0.5,"
    " body_timeout_s: 0.5, keepalive_timeout_s: 0.5}\n"
)
HOP_BY_HOP = ("connection", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization")


# ---- a raw HTTP/1.1 client ------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: list[tuple[str, str]]  # (lower-case name, value), in order
    body: bytes = b""
    complete: bool = True  # the body ended as its framing said (final 0-chunk, full length or EOF)
    arrivals: list[tuple[float, bytes]] = field(default_factory=list)  # chunked: (monotonic, data)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def names(self) -> set[str]:
        return {k for k, _ in self.headers}

    def json(self) -> Any:
        return orjson.loads(self.body)


class RawClient:
    """One TCP connection; writes bytes as given, reads responses with a small strict parser."""

    def __init__(self, address: tuple[str, int], timeout: float = TIMEOUT_S) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.eof = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        """Read more; False at EOF or reset (the peer is gone)."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _take(self, n: int) -> bytes | None:
        while len(self.buf) < n:
            if not self._fill():
                return None
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def _line(self) -> bytes | None:
        while b"\r\n" not in self.buf:
            if not self._fill():
                return None
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read_response(self, method: str = "GET") -> Reply:
        """The next response (an interim 1xx one included); raises at EOF before a full head."""
        while b"\r\n\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"connection closed before a response head; got {self.buf!r}")
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        version, status, *_ = status_line.split(" ", 2)
        assert version in ("HTTP/1.1", "HTTP/1.0"), status_line
        headers = [(k.strip().lower(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]
        reply = Reply(int(status), headers)
        if reply.status < 200 or reply.status in (204, 304) or method == "HEAD":
            return reply
        if (reply.header("transfer-encoding") or "").lower() == "chunked":
            self._read_chunked(reply)
        elif reply.header("content-length") is not None:
            length = int(reply.header("content-length") or 0)
            body = self._take(length)
            reply.complete = body is not None
            reply.body = body if body is not None else self.buf
        else:
            while self._fill():
                pass
            reply.body, self.buf = self.buf, b""
        return reply

    def _read_chunked(self, reply: Reply) -> None:
        parts = []
        reply.complete = False
        while True:
            size_line = self._line()
            if size_line is None:
                break
            size = int(size_line.split(b";")[0], 16)
            if size == 0:
                while (trailer := self._line()) not in (None, b""):
                    pass
                reply.complete = trailer == b""
                break
            data = self._take(size + 2)
            if data is None or data[-2:] != b"\r\n":
                break
            parts.append(data[:-2])
            reply.arrivals.append((time.monotonic(), data[:-2]))
        reply.body = b"".join(parts)

    def closed_within(self, seconds: float) -> bool:
        """True when the peer closes (EOF or reset) within ``seconds``, with nothing more to read."""
        self.sock.settimeout(seconds)
        try:
            while self._fill():
                pass
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(TIMEOUT_S)
        return True


def build(
    method: str,
    path: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    version: str = "HTTP/1.1",
) -> bytes:
    lines = [f"{method} {path} {version}", "host: sidecar.test"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None and not any(k.lower() == "transfer-encoding" for k, _ in headers):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chat_body(model: str = "demo-model", stream: bool = False) -> bytes:
    return orjson.dumps({"model": model, "messages": HI, "stream": stream})


def chat(model: str = "demo-model", stream: bool = False, headers: Sequence[tuple[str, str]] = ()) -> bytes:
    headers = [("content-type", "application/json"), *headers]
    return build("POST", "/v1/chat/completions", headers, chat_body(model, stream))


def assert_openai_error(reply: Reply, status: int) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    assert reply.header("content-type") == "application/json"
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    return error


def assert_rejected(client: RawClient, status: int) -> dict[str, Any]:
    """An OpenAI-shaped error with ``connection: close``, then the connection really closes."""
    reply = client.read_response()
    error = assert_openai_error(reply, status)
    assert reply.header("connection") == "close"
    assert client.closed_within(2.0), "the connection stayed open after a framing error"
    return error


def address(sidecar: SidecarProcess) -> tuple[str, int]:
    return sidecar.host, sidecar.port


def sse_events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e.startswith(b"data: ")]


# ---- a relay that can play a stale keep-alive connection -----------------------------------------


class StaleRelay:
    """A TCP relay in front of the mock. After ``go_stale()``, a connection that already carried a
    request is closed, without a byte of answer, as soon as more data arrives on it: the race of a
    backend closing an idle keep-alive connection just as the next request goes out."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.stale = threading.Event()
        self.stopping = threading.Event()
        self.dropped = 0
        self.accepted = 0
        self._sockets: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def go_stale(self) -> None:
        self.dropped = 0
        self.stale.set()

    def heal(self) -> None:
        self.stale.clear()

    def close(self) -> None:
        self.stopping.set()
        self._thread.join(2)
        self.listener.close()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.close()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.target, timeout=TIMEOUT_S)
        self._sockets += [client, upstream]
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        carried = False
        with contextlib.suppress(OSError):
            while data := client.recv(65536):
                if carried and self.stale.is_set():
                    self.dropped += 1
                    break
                carried = True
                upstream.sendall(data)
        for s in (client, upstream):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)


class ScriptedUpstream:
    """A backend that answers every request with the bytes in ``reply``, then closes the
    connection when ``close`` is set: for responses the mock cannot produce."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port: int = self.listener.getsockname()[1]
        self.reply = b"HTTP/1.1 204 No Content\r\n\r\n"
        self.close = False
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(2)
        self.listener.close()

    def _accept_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(TIMEOUT_S)
        buf = b""
        with conn, contextlib.suppress(OSError):
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, buf = buf.split(b"\r\n\r\n", 1)
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.lower().split(b"\r\n")[1:]
                        if line.startswith(b"content-length:")
                    ),
                    0,
                )
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                conn.sendall(self.reply)
                if self.close:
                    conn.shutdown(socket.SHUT_WR)
                    return


# ---- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fresh_mock(mock: MockProcess) -> None:
    mock.reset()


@pytest.fixture(scope="module")
def tight(mock: MockProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """Small limits: 1 KiB of headers, 1000 body bytes, 0.5 s header/body/keep-alive timeouts."""
    config = minimal_config(mock.url, extra=TIGHT_LIMITS)
    with SidecarProcess(config, tmp_path_factory.mktemp("tight")) as proc:
        yield proc


@pytest.fixture(scope="module")
def dead_port() -> Iterator[int]:
    """A port bound but not listening: connecting to it is refused, and no one else can take it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def relay(mock: MockProcess) -> Iterator[StaleRelay]:
    r = StaleRelay(("127.0.0.1", mock.port))
    yield r
    r.close()


@pytest.fixture(scope="module")
def spare() -> Iterator[MockProcess]:
    """A second mock backend, which a test stops and starts again on the same port."""
    proc = MockProcess().start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def aux(
    mock: MockProcess,
    spare: MockProcess,
    relay: StaleRelay,
    scripted: ScriptedUpstream,
    dead_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SidecarProcess]:
    upstreams = {
        "keyed": f'url: "{mock.url}", api_key: "sk-upstream"',
        "impatient": f'url: "{mock.url}", first_byte_timeout_s: 0.5',
        "dead": f'url: "http://127.0.0.1:{dead_port}"',
        "relayed": f'url: "http://127.0.0.1:{relay.port}", idle_timeout_s: 30',
        "spare": f'url: "{spare.url}", idle_timeout_s: 30',
        "scripted": f'url: "http://127.0.0.1:{scripted.port}"',
    }
    config = 'listen: {address: "127.0.0.1:0"}\nupstreams:\n'
    config += "".join(f"  {name}: {{{spec}}}\n" for name, spec in upstreams.items())
    config += "routes:\n" + "".join(
        f"  - {{model: {name}-model, targets: [{{upstream: {name}, model: mock-model-v1}}]}}\n"
        for name in upstreams
    )
    with SidecarProcess(config, tmp_path_factory.mktemp("aux")) as proc:
        yield proc


# ---- malformed framing: 400 and close -------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"GARBAGE\r\n\r\n", id="no-target-no-version"),
        pytest.param(b"GET /v1/models HTTP/9.x\r\nhost: x\r\n\r\n", id="bad-version"),
        pytest.param(b"GET /v1/mo dels HTTP/1.1\r\nhost: x\r\n\r\n", id="space-in-target"),
    ],
)
def test_malformed_request_line_gets_400_and_close(
    sidecar: SidecarProcess, mock: MockProcess, raw: bytes
) -> None:
    with RawClient(address(sidecar)) as client:
        client.send(raw)
        error = assert_rejected(client, 400)
    assert error["type"] == "invalid_request_error"
    assert mock.stats()["requests"] == 0


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"bad header: x", id="space-in-name"),
        pytest.param(b"no-colon-here", id="no-colon"),
        pytest.param(b"x-ctl: a\x01b", id="control-char-in-value"),
    ],
)
def test_bad_header_gets_400_and_close(sidecar: SidecarProcess, mock: MockProcess, header: bytes) -> None:
    with RawClient(address(sidecar)) as client:
        client.send(b"GET /v1/models HTTP/1.1\r\nhost: x\r\n" + header + b"\r\n\r\n")
        assert_rejected(client, 400)
    assert mock.stats()["requests"] == 0


def test_a_bad_request_after_a_good_one_on_the_same_connection(
    sidecar: SidecarProcess, mock: MockProcess
) -> None:
    """The good request is answered first, then the 400, then the connection closes."""
    with RawClient(address(sidecar)) as client:
        client.send(chat() + b"BROKEN REQUEST\r\n\r\n")
        assert client.read_response().status == 200
        assert_rejected(client, 400)
    assert mock.stats()["requests"] == 1


@pytest.mark.parametrize("te_first", [True, False], ids=["te-then-cl", "cl-then-te"])
def test_content_length_with_transfer_encoding_is_rejected(
    sidecar: SidecarProcess, mock: MockProcess, te_first: bool
) -> None:
    """Request smuggling: a front and a back that pick different framings see different requests."""
    smuggled = build("GET", "/v1/smuggled")
    body = b"0\r\n\r\n" + smuggled
    framing = [("transfer-encoding", "chunked"), ("content-length", str(len(body)))]
    headers = framing if te_first else framing[::-1]
    with RawClient(address(sidecar)) as client:
        client.send(build("POST", "/v1/echo", headers, body))
        assert_rejected(client, 400)
    assert mock.stats()["requests"] == 0


def test_two_different_content_lengths_are_rejected(sidecar: SidecarProcess, mock: MockProcess) -> None:
    head = b"POST /v1/echo HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 20\r\n\r\n"
    with RawClient(address(sidecar)) as client:
        client.send(head + b"{}" + b"x" * 18)
        assert_rejected(client, 400)
    assert mock.stats()["requests"] == 0


@pytest.mark.parametrize("coding", ["gzip", "gzip, chunked", "identity", "chunked, chunked"])
def test_transfer_encoding_other_than_chunked_is_rejected(
    sidecar: SidecarProcess, mock: MockProcess, coding: str
) -> None:
    body = b"2\r\n{}\r\n0\r\n\r\n"
    with RawClient(address(sidecar)) as client:
        client.send(build("POST", "/v1/echo", [("transfer-encoding", coding)], body))
        reply = client.read_response()
        assert reply.status in (400, 501), reply
        assert_openai_error(reply, reply.status)
        assert reply.header("connection") == "close"
        assert client.closed_within(2.0)
    assert mock.stats()["requests"] == 0


# ---- size limits --------------------------------------------------------------------------------


def test_headers_over_max_header_bytes_get_431_and_close(tight: SidecarProcess, mock: MockProcess) -> None:
    with RawClient(address(tight)) as client:
        client.send(build("GET", "/v1/models", [("x-big", "a" * 2000)]))
        assert_rejected(client, 431)
    assert mock.stats()["requests"] == 0


def test_headers_over_the_limit_are_refused_while_they_still_arrive(tight: SidecarProcess) -> None:
    """An endless header line gets 431 once it passes the limit, not when (if ever) it ends."""
    with RawClient(address(tight)) as client:
        client.send(b"GET /v1/models HTTP/1.1\r\nhost: x\r\nx-endless: ")
        started = time.monotonic()
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused midway
            for _ in range(8):
                client.send(b"a" * 512)
                time.sleep(0.01)
        error = assert_rejected(client, 431)
        assert time.monotonic() - started < 0.4, "the 431 waited for the header timeout"
    assert error["code"] is not None


def test_many_headers_over_the_limit_get_431(tight: SidecarProcess) -> None:
    headers = [(f"x-h{i}", "v" * 20) for i in range(60)]
    with RawClient(address(tight)) as client:
        client.send(build("GET", "/v1/models", headers))
        assert_rejected(client, 431)


def test_body_over_max_body_bytes_with_content_length_gets_413(
    tight: SidecarProcess, mock: MockProcess
) -> None:
    body = orjson.dumps({"model": "demo-model", "messages": [{"role": "user", "content": "x" * 1200}]})
    with RawClient(address(tight)) as client:
        client.send(build("POST", "/v1/chat/completions", [("content-type", "application/json")], body))
        error = assert_rejected(client, 413)
    assert "max_body_bytes" in error["message"]
    assert mock.stats()["requests"] == 0


def test_body_over_max_body_bytes_gets_413_even_when_the_client_already_sent_it_all(
    tight: SidecarProcess, mock: MockProcess
) -> None:
    """A client (the openai SDK, curl) that writes its whole body before reading must still get the
    413, not a connection reset because the sidecar closed with the body unread."""
    for size in (256 * 1024, 8 * 1024 * 1024):
        with RawClient(address(tight)) as client:
            # A body bigger than the socket buffers fails to send once the sidecar closes; httpx
            # then reads the answer anyway, as we do.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                client.send(build("POST", "/v1/chat/completions", [], b"x" * size))
            time.sleep(0.1)  # let the answer come and the sidecar close, before we read
            assert_rejected(client, 413)
    assert mock.stats()["requests"] == 0


def test_chunked_body_over_max_body_bytes_gets_413(tight: SidecarProcess, mock: MockProcess) -> None:
    chunks = b"".join(b"%x\r\n%b\r\n" % (300, b"y" * 300) for _ in range(4)) + b"0\r\n\r\n"
    with RawClient(address(tight)) as client:
        client.send(build("POST", "/v1/chat/completions", [("transfer-encoding", "chunked")], chunks))
        assert_rejected(client, 413)
    assert mock.stats()["requests"] == 0


def test_body_at_the_limit_is_accepted(tight: SidecarProcess, mock: MockProcess) -> None:
    filler = "x" * (1000 - len(chat_body()) - len(',"pad":""'))
    body = chat_body()[:-1] + b',"pad":"' + filler.encode() + b'"}'
    assert len(body) == 1000
    with RawClient(address(tight)) as client:
        client.send(build("POST", "/v1/chat/completions", [("content-type", "application/json")], body))
        assert client.read_response().status == 200
    assert mock.stats()["last_request"]["json"]["pad"] == filler


# ---- timeouts -----------------------------------------------------------------------------------


def test_slow_headers_get_408_after_header_timeout_and_close(
    tight: SidecarProcess, mock: MockProcess
) -> None:
    with RawClient(address(tight)) as client:
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        started = time.monotonic()
        error = assert_rejected(client, 408)
        waited = time.monotonic() - started
    assert 0.4 <= waited < 2.0, waited
    assert error["code"] == "request_timeout"
    assert mock.stats()["requests"] == 0


def test_slow_body_gets_408_and_close(tight: SidecarProcess, mock: MockProcess) -> None:
    with RawClient(address(tight)) as client:
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        started = time.monotonic()
        assert_rejected(client, 408)
        waited = time.monotonic() - started
    assert 0.4 <= waited < 2.0, waited
    assert mock.stats()["requests"] == 0


def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(tight: SidecarProcess) -> None:
    with RawClient(address(tight)) as client:
        client.send(build("GET", "/healthz"))
        reply = client.read_response()
        assert reply.status == 200 and reply.header("connection") is None
        answered = time.monotonic()
        assert client.closed_within(3.0)
        idle = time.monotonic() - answered
    assert 0.4 <= idle < 2.0, idle


def test_a_busy_keepalive_connection_is_not_closed_by_the_idle_timer(tight: SidecarProcess) -> None:
    """Requests every 0.3 s keep a 0.5 s keep-alive connection open for 1.2 s."""
    with RawClient(address(tight)) as client:
        for _ in range(4):
            client.send(build("GET", "/healthz"))
            assert client.read_response().status == 200
            time.sleep(0.3)
        client.send(build("GET", "/healthz"))
        assert client.read_response().status == 200


# ---- request bodies -----------------------------------------------------------------------------


def test_chunked_request_body_is_forwarded(sidecar: SidecarProcess, mock: MockProcess) -> None:
    body = chat_body()
    pieces = [body[:7], body[7:20], body[20:]]
    with RawClient(address(sidecar)) as client:
        head = [("content-type", "application/json"), ("transfer-encoding", "chunked")]
        client.send(build("POST", "/v1/chat/completions", head, b""))
        for piece in pieces:
            client.send(b"%x;ext=1\r\n%b\r\n" % (len(piece), piece))
            time.sleep(0.01)
        client.send(b"0\r\nx-trailer: t\r\n\r\n")
        reply = client.read_response()
    assert reply.status == 200, reply.body
    assert reply.json()["object"] == "chat.completion"
    seen = mock.stats()["last_request"]
    assert seen["json"] == {"model": "mock-model-v1", "messages": HI, "stream": False}
    assert "transfer-encoding" not in seen["headers"]
    assert seen["headers"]["content-length"] == str(len(orjson.dumps(seen["json"])))


def test_expect_100_continue_gets_100_before_the_body(sidecar: SidecarProcess, mock: MockProcess) -> None:
    body = chat_body()
    head = build("POST", "/v1/chat/completions", [("expect", "100-continue")], body)[: -len(body)]
    with RawClient(address(sidecar)) as client:
        client.send(head)
        interim = client.read_response()
        assert interim.status == 100
        assert mock.stats()["requests"] == 0
        client.send(body)
        reply = client.read_response()
    assert reply.status == 200
    seen = mock.stats()["last_request"]
    assert seen["json"]["model"] == "mock-model-v1"
    assert "expect" not in seen["headers"]


def test_expect_100_continue_with_too_large_a_body_gets_413_without_100(tight: SidecarProcess) -> None:
    with RawClient(address(tight)) as client:
        client.send(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\n")
        client.send(b"content-length: 5000\r\n\r\n")
        assert_rejected(client, 413)


# ---- connection reuse -----------------------------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(sidecar: SidecarProcess, mock: MockProcess) -> None:
    slow_first = [("x-request-id", "pipe-1"), ("x-mock-first-byte-ms", "100")]
    burst = (
        build("GET", "/v1/first", slow_first)
        + chat(headers=[("x-request-id", "pipe-2")])
        + build("GET", "/v1/third?q=3", [("x-request-id", "pipe-3")])
    )
    with RawClient(address(sidecar)) as client:
        client.send(burst)
        replies = [client.read_response() for _ in range(3)]
    assert [r.status for r in replies] == [200, 200, 200]
    assert [r.header("x-request-id") for r in replies] == ["pipe-1", "pipe-2", "pipe-3"]
    assert replies[0].json()["path"] == "/v1/first"
    assert replies[1].json()["object"] == "chat.completion"
    assert replies[2].json()["query_string"] == "q=3"
    assert mock.stats()["request_ids"] == ["pipe-1", "pipe-2", "pipe-3"]


def test_more_pipelined_requests_than_max_pipelined_are_all_answered_in_order(
    sidecar: SidecarProcess, mock: MockProcess
) -> None:
    """Past limits.max_pipelined (16) the sidecar stops reading, then resumes as answers go out."""
    requests = [chat(stream=i % 2 == 1, headers=[("x-request-id", f"p{i}")]) for i in range(48)]
    with RawClient(address(sidecar)) as client:
        for i in range(0, 48, 12):
            client.send(b"".join(requests[i : i + 12]))
        replies = [client.read_response() for _ in range(48)]
    assert [r.header("x-request-id") for r in replies] == [f"p{i}" for i in range(48)]
    assert all(r.status == 200 and r.complete for r in replies)
    assert mock.stats()["request_ids"] == [f"p{i}" for i in range(48)]


def test_keepalive_connection_serves_many_requests(sidecar: SidecarProcess, mock: MockProcess) -> None:
    with RawClient(address(sidecar)) as client:
        for i in range(30):
            client.send(chat(stream=i % 3 == 0, headers=[("x-request-id", f"ka-{i}")]))
            reply = client.read_response()
            assert reply.status == 200 and reply.complete
            assert reply.header("x-request-id") == f"ka-{i}"
            assert reply.header("connection") is None
    assert mock.stats()["requests"] == 30


def test_http10_request_is_answered_and_the_connection_closed(sidecar: SidecarProcess) -> None:
    with RawClient(address(sidecar)) as client:
        client.send(build("POST", "/v1/chat/completions", [], chat_body(), version="HTTP/1.0"))
        reply = client.read_response()
        assert reply.status == 200
        assert reply.json()["object"] == "chat.completion"
        assert client.closed_within(2.0)


def test_http10_stream_is_close_delimited(sidecar: SidecarProcess) -> None:
    """No chunked framing for an HTTP/1.0 client: the body ends with the connection."""
    with RawClient(address(sidecar)) as client:
        client.send(build("POST", "/v1/chat/completions", [], chat_body(stream=True), version="HTTP/1.0"))
        reply = client.read_response()
    assert reply.status == 200
    assert reply.header("transfer-encoding") is None
    assert sse_events(reply.body)[-1] == b"data: [DONE]"


def test_http10_keep_alive_is_honoured(sidecar: SidecarProcess, mock: MockProcess) -> None:
    with RawClient(address(sidecar)) as client:
        for _ in range(2):
            client.send(
                build("POST", "/v1/chat/completions", [("connection", "keep-alive")], chat_body(), "HTTP/1.0")
            )
            reply = client.read_response()
            assert reply.status == 200
            assert (reply.header("connection") or "").lower() == "keep-alive"
        assert not client.closed_within(0.2)
    assert mock.stats()["requests"] == 2


def test_connection_close_from_an_http11_client_is_honoured(sidecar: SidecarProcess) -> None:
    with RawClient(address(sidecar)) as client:
        client.send(chat(headers=[("connection", "close")]))
        reply = client.read_response()
        assert reply.status == 200 and reply.header("connection") == "close"
        assert client.closed_within(2.0)


# ---- headers ------------------------------------------------------------------------------------


def test_hop_by_hop_headers_are_not_forwarded_or_returned(sidecar: SidecarProcess, mock: MockProcess) -> None:
    headers = [
        ("connection", "keep-alive, x-secret-hop"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("trailer", "x-checksum"),
        ("upgrade", "websocket"),
        ("proxy-authorization", "Basic c2VjcmV0"),
        ("x-secret-hop", "only-for-the-next-hop"),
        ("x-end-to-end", "kept"),
    ]
    with RawClient(address(sidecar)) as client:
        client.send(chat(headers=headers))
        reply = client.read_response()
        assert reply.status == 200
        seen = mock.stats()["last_request"]["headers"]
        client.send(chat())  # the connection is still good
        assert client.read_response().status == 200
    assert not set(seen) & {*HOP_BY_HOP, "x-secret-hop"}, seen
    assert seen["x-end-to-end"] == "kept"
    assert not reply.names() & {*HOP_BY_HOP, "x-secret-hop", "proxy-authenticate"}

    with RawClient(address(sidecar)) as client:
        client.send(build("GET", "/v1/echo", headers))
        echo = client.read_response()
    assert echo.status == 200
    forwarded = echo.json()["headers"]
    assert not set(forwarded) & {*HOP_BY_HOP, "x-secret-hop"}, forwarded
    assert forwarded["x-end-to-end"] == "kept"
    assert not echo.names() & {*HOP_BY_HOP, "x-secret-hop"}


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_connection_upgrade_is_served_as_plain_http(
    sidecar: SidecarProcess, mock: MockProcess, chunked: bool
) -> None:
    """``Connection: upgrade`` + ``Upgrade`` (h2c, websocket) is ignored: the request, body included,
    is served as HTTP/1.1, and the connection goes on."""
    headers = [
        ("connection", "upgrade, http2-settings"),
        ("upgrade", "h2c"),
        ("http2-settings", "AAMAAABkAAQ"),
    ]
    body = chat_body()
    if chunked:
        headers.append(("transfer-encoding", "chunked"))
        body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
    with RawClient(address(sidecar)) as client:
        client.send(build("POST", "/v1/chat/completions", headers, body))
        reply = client.read_response()
        assert reply.status == 200
        assert reply.header("upgrade") is None
        client.send(chat(headers=[("x-request-id", "after-upgrade")]))
        assert client.read_response().header("x-request-id") == "after-upgrade"
    seen = mock.stats()
    assert seen["requests"] == 2
    assert seen["request_ids"][-1] == "after-upgrade"


def test_client_request_id_reaches_the_mock_and_comes_back(
    sidecar: SidecarProcess, mock: MockProcess
) -> None:
    with RawClient(address(sidecar)) as client:
        client.send(chat(headers=[("x-request-id", "client-chosen-42")]))
        reply = client.read_response()
    assert reply.header("x-request-id") == "client-chosen-42"
    assert [v for k, v in reply.headers if k == "x-request-id"] == ["client-chosen-42"]
    assert mock.stats()["last_request"]["headers"]["x-request-id"] == "client-chosen-42"


def test_a_missing_request_id_is_generated_returned_and_forwarded(
    sidecar: SidecarProcess, mock: MockProcess
) -> None:
    ids = []
    with RawClient(address(sidecar)) as client:
        for stream in (False, True):
            client.send(chat(stream=stream))
            reply = client.read_response()
            assert reply.status == 200
            ids.append(reply.header("x-request-id"))
    assert all(ids) and ids[0] != ids[1]
    assert mock.stats()["request_ids"] == ids


def test_an_overlong_request_id_is_replaced(sidecar: SidecarProcess, mock: MockProcess) -> None:
    with RawClient(address(sidecar)) as client:
        client.send(chat(headers=[("x-request-id", "r" * 500)]))
        reply = client.read_response()
    rid = reply.header("x-request-id")
    assert rid is not None and len(rid) < 200
    assert mock.stats()["last_request"]["headers"]["x-request-id"] == rid


def test_upstream_api_key_replaces_the_client_authorization(aux: SidecarProcess, mock: MockProcess) -> None:
    with RawClient(address(aux)) as client:
        client.send(chat("keyed-model", headers=[("authorization", "Bearer sk-client")]))
        reply = client.read_response()
        client.send(chat("keyed-model", stream=True, headers=[("authorization", "Bearer sk-client")]))
        streamed = client.read_response()
    assert reply.status == 200 and streamed.status == 200
    seen = mock.stats()["last_request"]["headers"]
    assert seen["authorization"] == "Bearer sk-upstream"  # one value: the client's is gone
    for r in (reply, streamed):
        assert b"sk-upstream" not in r.body
        assert all("sk-upstream" not in v for _, v in r.headers)


# ---- what the upstream answers ------------------------------------------------------------------


def test_hop_by_hop_response_headers_are_not_returned(
    aux: SidecarProcess, scripted: ScriptedUpstream
) -> None:
    scripted.close = False
    scripted.reply = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"connection: keep-alive, x-upstream-hop\r\nkeep-alive: timeout=5\r\nx-upstream-hop: secret\r\n"
        b"proxy-authenticate: Basic\r\ntrailer: x-sum\r\nupgrade: h2c\r\nx-end-to-end: kept\r\n"
        b"x-request-id: upstream-own\r\ncontent-length: 2\r\n\r\n{}"
    )
    with RawClient(address(aux)) as client:
        client.send(chat("scripted-model", headers=[("x-request-id", "mine")]))
        reply = client.read_response()
    assert reply.status == 200 and reply.body == b"{}"
    assert reply.header("x-end-to-end") == "kept"
    assert reply.get_all("x-request-id") == ["mine"]
    assert not reply.names() & {*HOP_BY_HOP, "x-upstream-hop", "proxy-authenticate"}, reply.headers


def test_an_interim_100_from_the_upstream_is_not_passed_on(
    aux: SidecarProcess, scripted: ScriptedUpstream
) -> None:
    scripted.close = False
    scripted.reply = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok"
    with RawClient(address(aux)) as client:
        client.send(chat("scripted-model"))
        reply = client.read_response()
        client.send(build("GET", "/healthz"))
        after = client.read_response()
    assert (reply.status, reply.body) == (201, b"ok")
    assert after.status == 200


def test_a_close_delimited_upstream_body_is_forwarded_whole(
    aux: SidecarProcess, scripted: ScriptedUpstream
) -> None:
    scripted.close = True
    scripted.reply = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n" + b"z" * 100_000
    )
    try:
        with RawClient(address(aux)) as client:
            client.send(chat("scripted-model"))
            reply = client.read_response()
            client.send(build("GET", "/healthz"))
            after = client.read_response()
    finally:
        scripted.close = False
    assert reply.status == 200 and reply.complete
    assert reply.body == b"z" * 100_000
    assert after.status == 200


def test_a_malformed_upstream_response_gets_502(aux: SidecarProcess, scripted: ScriptedUpstream) -> None:
    scripted.close = False
    scripted.reply = b"HTTP/1.1 200 OK\r\ncontent-length: nope\r\n\r\n"
    with RawClient(address(aux)) as client:
        client.send(chat("scripted-model"))
        error = assert_openai_error(client.read_response(), 502)
    assert error["type"] == "server_error"


# ---- upstream failures ----------------------------------------------------------------------------


def test_dead_upstream_gets_502(aux: SidecarProcess) -> None:
    with RawClient(address(aux)) as client:
        client.send(chat("dead-model"))
        error = assert_openai_error(client.read_response(), 502)
        client.send(build("GET", "/healthz"))  # the client connection survives an upstream failure
        assert client.read_response().status == 200
    assert error["type"] == "server_error"
    assert "dead" in error["message"]


def test_upstream_stalling_its_first_byte_gets_504(aux: SidecarProcess, mock: MockProcess) -> None:
    with RawClient(address(aux)) as client:
        started = time.monotonic()
        client.send(chat("impatient-model", headers=[("x-mock-first-byte-ms", "3000")]))
        reply = client.read_response()
        waited = time.monotonic() - started
    error = assert_openai_error(reply, 504)
    assert error["code"] == "upstream_timeout"
    assert 0.4 <= waited < 2.0, waited
    # The sidecar gave up on the upstream call: the backend sees the disconnect and stops.
    mock.wait_stats(lambda s: s["disconnects"] == 1)


def test_upstream_reset_mid_stream_ends_the_sse_stream_with_an_error_event(
    sidecar: SidecarProcess, mock: MockProcess
) -> None:
    knobs = [("x-mock-chunks", "10"), ("x-mock-delay-ms", "5"), ("x-mock-reset-after", "3")]
    with RawClient(address(sidecar)) as client:
        client.send(chat(stream=True, headers=knobs))
        reply = client.read_response()
        assert client.closed_within(2.0)
    assert reply.status == 200
    assert reply.header("transfer-encoding") == "chunked"
    events = sse_events(reply.body)
    assert len(events) == 4, events  # three from the upstream, then the error: not a silent cut
    error = orjson.loads(events[-1].removeprefix(b"data: "))["error"]
    assert error["code"] == "upstream_connection_closed" and error["type"] == "server_error"
    assert b"[DONE]" not in reply.body


def test_upstream_reset_mid_body_with_content_length_is_cut_short(
    sidecar: SidecarProcess, mock: MockProcess
) -> None:
    knobs = [("x-mock-content-bytes", "100000"), ("x-mock-reset-after", "5000")]
    with RawClient(address(sidecar)) as client:
        client.send(chat(headers=knobs))
        reply = client.read_response()
    assert reply.status == 200
    assert not reply.complete and len(reply.body) < int(reply.header("content-length") or 0)


def test_client_disconnect_mid_stream_reaches_the_upstream_at_once(
    sidecar: SidecarProcess, mock: MockProcess
) -> None:
    knobs = [("x-mock-chunks", "100"), ("x-mock-delay-ms", "20")]
    with RawClient(address(sidecar)) as client:
        client.send(chat(stream=True, headers=knobs))
        while b"data: " not in client.buf:  # the head and the first event
            assert client._fill()
    closed = time.monotonic()
    stats = mock.wait_stats(lambda s: s["disconnects"] == 1)
    assert stats["completed"] == 0
    assert stats["disconnect_times"][-1] - closed < 0.1


def test_client_disconnect_before_the_response_head_cancels_the_upstream_call(
    sidecar: SidecarProcess, mock: MockProcess
) -> None:
    with RawClient(address(sidecar)) as client:
        client.send(chat(headers=[("x-mock-first-byte-ms", "3000")]))
        mock.wait_stats(lambda s: s["in_flight"] == 1)
    closed = time.monotonic()
    stats = mock.wait_stats(lambda s: s["disconnects"] == 1)
    assert stats["disconnect_times"][-1] - closed < 0.1


def test_a_stale_pooled_connection_is_retried_on_a_fresh_one(
    aux: SidecarProcess, mock: MockProcess, relay: StaleRelay
) -> None:
    with RawClient(address(aux)) as client:
        client.send(chat("relayed-model"))
        assert client.read_response().status == 200
        relay.go_stale()
        try:
            client.send(chat("relayed-model", headers=[("x-request-id", "after-stale")]))
            reply = client.read_response()
        finally:
            relay.heal()
    assert reply.status == 200, reply.body
    assert relay.dropped == 1  # the pooled connection was reused, found dead, and the request re-sent
    assert mock.stats()["request_ids"][-1] == "after-stale"
    assert mock.stats()["requests"] == 2


def test_a_restarted_upstream_is_reached_again(aux: SidecarProcess, spare: MockProcess) -> None:
    with RawClient(address(aux)) as client:
        client.send(chat("spare-model"))
        assert client.read_response().status == 200
        port = spare.port
        spare.stop()
        spare.requested_port = port
        spare.start()
        client.send(chat("spare-model", headers=[("x-request-id", "after-restart")]))
        reply = client.read_response()
    assert reply.status == 200, reply.body
    assert spare.stats()["request_ids"] == ["after-restart"]


# ---- streaming ------------------------------------------------------------------------------------


def test_stream_chunks_are_forwarded_as_they_arrive(sidecar: SidecarProcess) -> None:
    knobs = [("x-mock-chunks", "20"), ("x-mock-delay-ms", "10")]
    with RawClient(address(sidecar)) as client:
        client.send(chat(stream=True, headers=knobs))
        reply = client.read_response()
    assert reply.status == 200 and reply.complete
    events = sse_events(reply.body)
    assert len(events) == 22 and events[-1] == b"data: [DONE]"  # 20 content, the stop chunk, [DONE]
    times = [t for t, data in reply.arrivals if b"data: " in data]
    assert times[-1] - times[0] >= 0.18, "the stream was buffered"
    assert len(reply.arrivals) >= 15  # chunk by chunk, not in a few bursts


def test_a_large_non_stream_body_arrives_whole(sidecar: SidecarProcess) -> None:
    with RawClient(address(sidecar)) as client:
        client.send(chat(headers=[("x-mock-content-bytes", "3000000")]))
        reply = client.read_response()
    assert reply.status == 200 and reply.complete
    assert len(reply.json()["choices"][0]["message"]["content"]) == 3_000_000
