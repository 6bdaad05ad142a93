"""A blocking HTTP/2 client over a raw socket, driven by the test: h2 for valid traffic, raw frames
(hyperframe) for what h2 would refuse to send, and a frame reader that finds the server's GOAWAY.

    with RawH2(host, port) as c:
        sid = c.request("POST", "/v1/chat/completions", {"model": "demo-model", ...})
        status, headers, body = c.response(sid)
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import orjson
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    ResponseReceived,
    StreamEnded,
    StreamReset,
)
from h2.exceptions import ProtocolError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import Frame, GoAwayFrame

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class Closed(Exception):
    """The server closed the connection."""


class RawH2:
    def __init__(
        self, host: str, port: int, *, timeout: float = 5.0, settings: dict[SettingCodes, int] | None = None
    ):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        if settings:  # sent with the preface, in force at once
            self.conn.local_settings = Settings(client=True, initial_values=settings)
        self.conn.initiate_connection()
        self.flush()
        self.status: dict[int, int] = {}
        self.headers: dict[int, list[tuple[bytes, bytes]]] = {}
        self.bodies: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.goaway: ConnectionTerminated | None = None
        self.closed = False

    # -- sending -----------------------------------------------------------------------------------
    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        headers: dict[str, str] | None = None,
        *,
        end: bool = True,
        flush: bool = True,
    ) -> int:
        sid: int = self.conn.get_next_available_stream_id()
        body = b"" if payload is None else payload if isinstance(payload, bytes) else orjson.dumps(payload)
        head = [(b":method", method.encode()), (b":path", path.encode())]
        head += [(b":scheme", b"http"), (b":authority", b"sidecar")]
        if body:
            head += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        head += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
        self.conn.send_headers(sid, head, end_stream=end and not body)
        if body:
            self.conn.send_data(sid, body, end_stream=end)
        if flush:
            self.flush()
        return sid

    # -- receiving ---------------------------------------------------------------------------------
    def pump(self, timeout: float | None = None) -> list[Event]:
        """Read once (up to ``timeout``) and handle what came; [] on a timeout."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return []
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            raise Closed
        try:
            events = self.conn.receive_data(data)
        except ProtocolError:
            events = []
        for event in events:
            sid = getattr(event, "stream_id", 0)
            if isinstance(event, ResponseReceived):
                self.status[sid] = int(dict(event.headers or [])[b":status"])
                self.headers[sid] = list(event.headers or [])
            elif isinstance(event, DataReceived):
                self.bodies.setdefault(sid, bytearray()).extend(event.data or b"")
                self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, StreamEnded):
                self.ended.add(sid)
            elif isinstance(event, StreamReset):
                self.resets[sid] = int(event.error_code)
            elif isinstance(event, ConnectionTerminated):
                self.goaway = event
        self.flush()
        return events

    def wait(self, done: Any, timeout: float | None = None) -> None:
        """Pump until ``done()`` is true; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while not done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the server did not answer in time")
            self.pump(left)

    def response(self, sid: int, timeout: float | None = None) -> tuple[int, dict[bytes, bytes], bytes]:
        self.wait(lambda: sid in self.ended or sid in self.resets, timeout)
        if sid not in self.ended:  # (a complete response may be followed by RST_STREAM NO_ERROR)
            raise AssertionError(f"stream {sid} was reset with error {self.resets[sid]}")
        return self.status[sid], dict(self.headers[sid]), bytes(self.bodies.get(sid, b""))

    def json(self, sid: int) -> Any:
        status, _, body = self.response(sid)
        return status, orjson.loads(body)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def frames(sock: socket.socket, timeout: float = 5.0) -> Iterator[Frame]:
    """The server's frames, parsed by hyperframe without any client state, until it closes."""
    sock.settimeout(timeout)
    buffer = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        while len(buffer) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(bytes(buffer[:9])))
            if len(buffer) < 9 + length:
                break
            frame.parse_body(memoryview(bytes(buffer[9 : 9 + length])))
            del buffer[: 9 + length]
            yield frame
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except ConnectionResetError:
            return
        if not data:
            return
        buffer += data
    raise TimeoutError("the server neither sent what was expected nor closed")


def read_goaway(sock: socket.socket, timeout: float = 5.0) -> tuple[int, int] | None:
    """Read raw frames until the server's GOAWAY: (error code, last stream id); None if it closed
    without one."""
    for frame in frames(sock, timeout):
        if isinstance(frame, GoAwayFrame):
            return frame.error_code, frame.last_stream_id
    return None


def closed_after(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the server has closed the connection (reads drain whatever is left)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False
