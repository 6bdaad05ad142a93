"""HTTP/2 (h2c, prior knowledge) for the mock backend: ``python -m bench.mock_backend --h2c``.

aiohttp cannot serve HTTP/2, so with ``--h2c`` the mock's port sniffs each new connection: one
that opens with the HTTP/2 preface is served here, on the ``h2`` state machine; any other goes to
the aiohttp app as before (the control endpoints stay HTTP/1.1). Both share one
:class:`~bench.mock_backend.MockState`: the same stats and global faults.

The OpenAI endpoints answer as over HTTP/1.1 (the same :class:`~bench.mock_backend.Generation`,
embeddings, knobs, global faults and answer accounting). Differences: ``x-mock-reset-after`` and
``reset_ratio`` reset the *stream* (RST_STREAM INTERNAL_ERROR), not the connection; a client's
RST_STREAM counts as a disconnect.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Iterator
from typing import Any, cast

import orjson
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RequestReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError

from bench.mock_backend import (
    _MODELS_BODY,
    BadKnob,
    FaultPlan,
    Knobs,
    MockState,
    embeddings_body,
    error_body,
    plan_generation,
    stream_usage,
)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_MAX_BODY = 64 * 1024 * 1024


class _Reset(Exception):
    """The mock resets this stream on purpose (a reset knob or fault)."""


class Sniff(asyncio.Protocol):
    """The first bytes of a connection pick HTTP/2 (this module) or HTTP/1.1 (aiohttp)."""

    def __init__(self, state: MockState, http1: Callable[[], asyncio.Protocol]) -> None:
        self.state = state
        self.http1 = http1
        self.transport: asyncio.Transport | None = None
        self.seen = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.seen += data
        head = self.seen[: len(PREFACE)]
        if PREFACE.startswith(head) and len(head) < len(PREFACE):
            return  # could still be the preface
        protocol = H2cConnection(self.state) if head == PREFACE else self.http1()
        assert self.transport is not None
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(self.seen)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class _Stream:
    def __init__(self, sid: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.sid = sid
        self.pseudo = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers if k.startswith(b":")}
        self.headers = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in headers if not k.startswith(b":")
        }
        self.body: list[bytes] = []
        self.size = 0
        self.task: asyncio.Task[None] | None = None
        self.window = asyncio.Event()
        self.status: int | None = None  # of the response head sent


class H2cConnection(asyncio.Protocol):
    """One h2c client connection of the mock: a task per stream."""

    def __init__(self, state: MockState) -> None:
        self.state = state
        self.h2 = H2Connection(H2Configuration(client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, _Stream] = {}
        self.writable = asyncio.Event()
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        stats = self.state.stats
        stats.h2_connections += 1
        stats.h2_open_connections += 1
        stats.h2_max_open_connections = max(stats.h2_max_open_connections, stats.h2_open_connections)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(16 * 1024 * 1024)
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except ProtocolError:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, RequestReceived):
                self.streams[event.stream_id] = _Stream(event.stream_id, list(event.headers or []))
            elif isinstance(event, DataReceived):
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                st = self.streams.get(event.stream_id)
                if st is not None and event.data:
                    st.size += len(event.data)
                    if st.size > _MAX_BODY:
                        self.h2.reset_stream(st.sid, ErrorCodes.REFUSED_STREAM)
                        del self.streams[st.sid]
                    else:
                        st.body.append(event.data)
            elif isinstance(event, StreamEnded):
                st = self.streams.get(event.stream_id)
                if st is not None and st.task is None:
                    st.task = asyncio.get_running_loop().create_task(self._serve(st))
            elif isinstance(event, StreamReset):
                self._drop(event.stream_id)
            elif isinstance(event, WindowUpdated):
                targets = (
                    self.streams.values() if event.stream_id == 0 else [self.streams.get(event.stream_id)]
                )
                for st in targets:
                    if st is not None:
                        st.window.set()
            elif isinstance(event, ConnectionTerminated) and self.transport is not None:
                self.transport.close()
        self.flush()

    def _drop(self, sid: int) -> None:
        st = self.streams.pop(sid, None)
        if st is not None and st.task is not None:
            st.task.cancel()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.stats.h2_open_connections -= 1
        for sid in list(self.streams):
            self._drop(sid)
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()

    # -- one request -----------------------------------------------------------------------------
    async def _serve(self, st: _Stream) -> None:
        method, path = st.pseudo.get(":method", "GET"), st.pseudo.get(":path", "/")
        try:
            knobs = Knobs.parse(st.headers)
        except BadKnob as e:
            await self._send(st, 400, _JSON, error_body(400, str(e)))
            return
        body = b"".join(st.body)
        data = self.state.record_start(method, path.split("?", 1)[0], st.headers, body)
        aborted = disconnected = False
        status: int | None = None
        try:
            await self._answer(st, method, path, knobs, data, body)
            status = st.status  # the answer went out in full
        except asyncio.CancelledError:
            disconnected = True
        except _Reset:
            aborted = True
            self._reset(st)
        except (StreamClosedError, ProtocolError, ConnectionError):
            disconnected = True
        finally:
            self.streams.pop(st.sid, None)
            request_id = st.headers.get("x-request-id")
            self.state.record_end(
                aborted=aborted, disconnected=disconnected, status=status, request_id=request_id
            )

    async def _answer(
        self, st: _Stream, method: str, path: str, knobs: Knobs, data: Any, body: bytes
    ) -> None:
        plan = FaultPlan.of(method, knobs, self.state.faults)
        if plan.reset:
            raise _Reset
        if plan.first_byte_s > 0:
            await asyncio.sleep(plan.first_byte_s)
        status, retry_after = plan.status, plan.retry_after
        if status is not None:
            headers = list(_JSON)
            if retry_after is not None:
                headers += [
                    (b"retry-after", f"{retry_after:g}".encode()),
                    (b"retry-after-ms", f"{retry_after * 1000:g}".encode()),
                ]
            message = f"mock backend: injected status {status}"
            await self._send_json(st, knobs, status, headers, error_body(status, message))
            return
        route = path.split("?", 1)[0]
        if method == "POST" and route in ("/v1/chat/completions", "/v1/completions"):
            if not isinstance(data, dict):
                await self._send(st, 400, _JSON, error_body(400, "request body must be a JSON object"))
                return
            gen = plan_generation(route == "/v1/chat/completions", data, knobs, self.state)
            if data.get("stream"):
                await self._send_events(st, knobs, gen.events(stream_usage(data)))
            else:
                await self._send_json(st, knobs, 200, _JSON, gen.body())
        elif method == "POST" and route == "/v1/embeddings":
            try:
                answer = embeddings_body(data)
            except BadKnob as e:
                await self._send(st, 400, _JSON, error_body(400, str(e)))
                return
            await self._send_json(st, knobs, 200, _JSON, answer)
        elif method == "GET" and route == "/v1/models":
            await self._send_json(st, knobs, 200, _JSON, _MODELS_BODY)
        else:
            echo = {
                "object": "mock.echo",
                "method": method,
                "path": route,
                "raw_path": path,
                "headers": st.headers,
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "model": data.get("model") if isinstance(data, dict) else None,
                "http_version": "2",
            }
            await self._send_json(st, knobs, 200, _JSON, orjson.dumps(echo))

    async def _send_json(
        self, st: _Stream, knobs: Knobs, status: int, headers: list[tuple[bytes, bytes]], payload: bytes
    ) -> None:
        cut = knobs.fault_point()
        if cut is None:
            await self._send(st, status, headers, payload)
            return
        self._head(st, status, [*headers, (b"content-length", b"%d" % len(payload))], end=False)
        await self._data(st, payload[:cut], end=False)
        await self._fault(knobs, cut)

    async def _send_events(self, st: _Stream, knobs: Knobs, events: Iterator[bytes]) -> None:
        cut, delay = knobs.fault_point(), knobs.delay_s
        self._head(st, 200, _SSE, end=False)
        for sent, event in enumerate(events):
            if sent == cut:
                await self._fault(knobs, sent)
            if sent and delay:
                await asyncio.sleep(delay)
            await self._data(st, event, end=False)
        self.h2.end_stream(st.sid)
        self.flush()

    async def _fault(self, knobs: Knobs, sent: int) -> None:
        if knobs.reset_after == sent:
            raise _Reset
        await asyncio.get_running_loop().create_future()  # stall until the client resets the stream

    async def _send(self, st: _Stream, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self._head(st, status, [*headers, (b"content-length", b"%d" % len(body))], end=not body)
        if body:
            await self._data(st, body, end=True)

    def _head(self, st: _Stream, status: int, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        st.status = status
        self.h2.send_headers(st.sid, [(b":status", b"%d" % status), *headers], end_stream=end)
        self.flush()

    async def _data(self, st: _Stream, data: bytes, end: bool) -> None:
        if not data and not end:
            return
        view = memoryview(data)
        while True:
            await self.writable.wait()
            room = min(self.h2.local_flow_control_window(st.sid), self.h2.max_outbound_frame_size)
            if room <= 0 and view:
                st.window.clear()
                await st.window.wait()
                continue
            piece, view = view[:room], view[room:]
            self.h2.send_data(st.sid, piece, end_stream=end and not view)
            self.flush()
            if not view:
                return

    def _reset(self, st: _Stream) -> None:
        try:
            self.h2.reset_stream(st.sid, ErrorCodes.INTERNAL_ERROR)
        except (StreamClosedError, ProtocolError):
            return
        self.flush()


async def listen(
    state: MockState, http1: Callable[[], asyncio.Protocol], host: str, port: int
) -> asyncio.Server:
    """Listen on ``host:port`` for HTTP/1.1 (``http1`` makes aiohttp's protocol) and h2c."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: Sniff(state, http1), host, port, backlog=1024, reuse_address=True)
