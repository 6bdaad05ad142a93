"""One multiplexed HTTP/2 connection to an upstream, an asyncio.Protocol around h2 (client side).

``request()`` opens a stream (HEADERS, then the body within the peer's windows) and waits for the
response head. A response that is complete in the batch of frames that brought its head, and has a
content-length or no DATA at all, comes back as ``bytes``; otherwise an
:class:`~proxy.upstream.h2_body.H2Body` streams the rest, acknowledged as the client takes it. Per
stream: the first-byte timeout (→ 504) and the read timeout (a gap between DATA frames; the stream
is reset). Per connection one timer: PING after
``h2_ping_interval_s`` of silence, closed if no frame comes back within ``h2_ping_timeout_s``;
closed once idle (no streams) for ``idle_timeout_s``.

GOAWAY: streams above its last_stream_id were never processed and fail with :class:`Retry` (the
pool sends them again elsewhere); the others finish; no new stream opens here and the connection
closes when its last stream is done. REFUSED_STREAM is a :class:`Retry` too. h2 treats a received
GOAWAY as the end of the connection and would reject the frames of the streams that may still
finish: :class:`_GoawayTolerant` keeps its state machine open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, cast

from h2.config import H2Configuration
from h2.connection import ConnectionInputs, H2ConnectionStateMachine
from h2.connection import H2Connection as H2State
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    Event,
    PingAckReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError, TooManyStreamsError
from h2.settings import SettingCodes, Settings

from proxy.errors import UpstreamClosed, UpstreamProtocolError, UpstreamTimeout
from proxy.h2.hpack_encoder import StaticEncoder
from proxy.http import Headers
from proxy.upstream.base import RESPONSE_DROP
from proxy.upstream.h2_body import H2Body

if TYPE_CHECKING:
    from hpack import Encoder

    from proxy.upstream.h2_pool import H2Pool

log = logging.getLogger("llm_sidecar.upstream")

INF = float("inf")
ASSUMED_STREAMS = 100  # the peer's stream limit until its SETTINGS say (RFC 9113 recommends ≥ 100)
_PING = b"sidecar!"
Result = tuple[int, Headers, "bytes | H2Body"]


class Retry(Exception):
    """The upstream never processed this stream (GOAWAY above it, REFUSED_STREAM, a dead idle
    connection): safe to send again on another connection."""


class _GoawayTolerant(H2ConnectionStateMachine):
    """Stay open after a received GOAWAY, so streams up to its last_stream_id can finish."""

    def process_input(self, input_: ConnectionInputs) -> list[Event]:
        if input_ is ConnectionInputs.RECV_GOAWAY:
            return []
        return super().process_input(input_)


class _Stream:
    __slots__ = (
        "active",
        "body",
        "deadline",
        "early",
        "ended",
        "head",
        "out",
        "recv_mark",
        "sid",
        "timer",
        "waiter",
    )

    def __init__(self, sid: int, waiter: asyncio.Future[Result], recv_mark: int) -> None:
        self.sid = sid
        self.waiter: asyncio.Future[Result] | None = waiter
        self.head: tuple[int, Headers, int | None] | None = None  # status, headers, content-length
        self.early: list[tuple[bytes, int]] = []  # DATA in the batch that brought the head
        self.ended = False  # END_STREAM received
        self.body: H2Body | None = None
        self.out: memoryview | None = None  # request body the peer's window has not let out yet
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = INF  # the response must be complete by then (total_timeout_s)
        self.active = False  # DATA since the read timer last looked
        self.recv_mark = recv_mark  # the connection's read count when the stream opened


class H2UpstreamConnection(asyncio.Protocol):
    def __init__(self, pool: H2Pool, loop: asyncio.AbstractEventLoop) -> None:
        self.pool = pool
        self.loop = loop
        cfg = pool.cfg
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] = loop.create_future()  # connected and the peer's SETTINGS in
        self.closed = False
        self.goaway = False  # no new streams (GOAWAY received or sent)
        self.capacity = ASSUMED_STREAMS
        self.active = 0  # streams reserved or open (the pool's count)
        self.reused = False  # has carried a stream before
        self.reads = 0
        self.in_batch = False
        self.idle_since = loop.time()
        self.last_recv = loop.time()
        self.ping_deadline = INF
        self.streams: dict[int, _Stream] = {}
        self.sending: dict[int, _Stream] = {}  # streams with request body left to send
        self._resolve: list[_Stream] = []  # heads received in this batch
        self._timer: asyncio.TimerHandle | None = None
        self._flush_queued = False
        h2 = H2State(
            H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        h2.state_machine = _GoawayTolerant()
        h2.encoder = cast("Encoder", StaticEncoder())
        h2.local_settings = Settings(
            client=True,
            initial_values={
                SettingCodes.ENABLE_PUSH: 0,
                SettingCodes.MAX_CONCURRENT_STREAMS: 0,  # no pushed streams
                SettingCodes.INITIAL_WINDOW_SIZE: cfg.h2_window_bytes,
                SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        h2.decoder.max_header_list_size = 65536
        self.h2 = h2

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        extra = self.pool.cfg.h2_connection_window_bytes - 65535
        if extra > 0:
            self.h2.increment_flow_control_window(extra)
        self.flush()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.reads += 1
        self.last_recv = self.loop.time()
        self.ping_deadline = INF
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:
            self.close_for(UpstreamProtocolError(f"upstream {self.pool.name!r} broke HTTP/2: {e}"))
            return
        self.in_batch = True
        try:
            for event in events:
                kind = type(event)
                if kind is DataReceived:
                    self._on_data(cast(DataReceived, event))
                elif kind is ResponseReceived:
                    self._on_response(cast(ResponseReceived, event))
                elif kind is StreamEnded:
                    self._on_ended(cast(StreamEnded, event).stream_id)
                elif kind is StreamReset:
                    self._on_reset(cast(StreamReset, event))
                elif kind is WindowUpdated:
                    self._on_window(cast(WindowUpdated, event).stream_id)
                elif kind is RemoteSettingsChanged:
                    self._on_settings(cast(RemoteSettingsChanged, event))
                elif kind is ConnectionTerminated:
                    self._on_goaway(cast(ConnectionTerminated, event))
                elif kind is PingAckReceived:
                    pass  # any frame counts as an answer (last_recv)
                if self.closed:
                    return
        finally:
            self.in_batch = False
        if self._resolve:
            self._resolve_heads()
        self.flush()

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.close_for(UpstreamClosed(f"upstream {self.pool.name!r} closed the connection"))

    # -- streams ---------------------------------------------------------------------------------
    async def request(self, headers: list[tuple[bytes, bytes]], body: bytes) -> Result:
        """Open a stream, send the request, wait for the head. The pool holds a slot for it."""
        if self.closed or self.goaway:
            self.pool.stream_done(self)
            raise Retry()
        h2 = self.h2
        sid = h2.get_next_available_stream_id()
        try:
            h2.send_headers(sid, headers, end_stream=not body)
        except TooManyStreamsError:  # the peer lowered its limit since we counted
            self.pool.stream_done(self)
            raise Retry() from None
        waiter: asyncio.Future[Result] = self.loop.create_future()
        # A stream sent on a connection that sat idle may meet a connection the peer has dropped:
        # if nothing at all comes back before it dies, the stream is sent again (see _forget_closed).
        st = _Stream(sid, waiter, self.reads if self.reused and not self.streams else -1)
        self.streams[sid] = st
        if body:
            st.out = memoryview(body)
            self._send_body(st)
        cfg = self.pool.cfg
        st.deadline = self.loop.time() + cfg.total_timeout_s
        st.timer = self.loop.call_later(
            min(cfg.first_byte_timeout_s, cfg.total_timeout_s), self._head_timeout, st
        )
        if self.last_recv < self.loop.time() - cfg.h2_ping_interval_s:
            self._ping()  # silent for long: is it still there?
        if not self._flush_queued:  # the requests sent in one loop iteration go out in one write
            self._flush_queued = True
            self.loop.call_soon(self._queued_flush)
        try:
            return await waiter
        except asyncio.CancelledError:
            if st.waiter is waiter:  # the client left before the head: stop the backend's work
                self.cancel_stream(sid)
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                late = waiter.result()[2]  # the head came as we were cancelled: nobody will read it
                if isinstance(late, H2Body):
                    late.abort()
            raise

    def _send_body(self, st: _Stream) -> None:
        h2 = self.h2
        view = st.out
        assert view is not None
        sid = st.sid
        while view:
            room = min(h2.local_flow_control_window(sid), h2.max_outbound_frame_size)
            if room <= 0:
                break
            piece, view = view[:room], view[room:]
            h2.send_data(sid, piece, end_stream=not view)
        if view:
            st.out = view
            self.sending[sid] = st
        else:
            st.out = None
            self.sending.pop(sid, None)

    def acknowledge(self, sid: int, flow: int) -> None:
        """The consumer took ``flow`` bytes of stream ``sid``: the window may reopen."""
        if flow and not self.closed:
            self.h2.acknowledge_received_data(flow, sid)

    def flush_soon(self) -> None:
        if not self.in_batch:
            self.flush()

    def cancel_stream(self, sid: int) -> None:
        """RST_STREAM CANCEL (client gone or a timeout); the stream's slot is freed."""
        st = self.streams.pop(sid, None)
        if st is None:
            return
        self._forget(st)
        if not self.closed:
            with contextlib.suppress(StreamClosedError, ProtocolError):
                self.h2.reset_stream(sid, ErrorCodes.CANCEL)
            self.flush_soon()
        self.pool.stream_done(self)

    def _forget(self, st: _Stream) -> None:
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        st.waiter = None
        self.sending.pop(st.sid, None)

    def _finish(self, st: _Stream) -> None:
        """The stream is over (ended both ways, or reset): free its slot."""
        if self.streams.pop(st.sid, None) is None:
            return
        self._forget(st)
        self.reused = True
        if st.out is not None and not self.closed:  # the answer came before our body went out
            with contextlib.suppress(StreamClosedError, ProtocolError):
                self.h2.reset_stream(st.sid, ErrorCodes.NO_ERROR)
        self.pool.stream_done(self)

    # -- frames from the upstream ----------------------------------------------------------------
    def _on_response(self, event: ResponseReceived) -> None:
        st = self.streams.get(event.stream_id)
        if st is None or st.head is not None:
            return
        status = 0
        length: int | None = None
        headers = Headers()
        drop = RESPONSE_DROP
        for name, value in event.headers or ():
            if name[:1] == b":":
                if name == b":status" and value.isdigit():
                    status = int(value)
            elif name == b"content-length":
                length = int(value) if value.isdigit() else None
            elif name not in drop:
                headers.append((name, value))
        st.head = (status, headers, length)
        self._resolve.append(st)

    def _on_data(self, event: DataReceived) -> None:
        sid = event.stream_id
        flow = event.flow_controlled_length or 0
        st = self.streams.get(sid)
        if st is None:
            if flow:
                self.h2.acknowledge_received_data(flow, sid)
            return
        st.active = True
        body = st.body
        if body is not None:
            body.feed(event.data or b"", flow)
        else:
            st.early.append((event.data or b"", flow))

    def _on_ended(self, sid: int) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        st.ended = True
        body = st.body
        if body is not None:
            self._finish(st)
            body.end(None)

    def _on_reset(self, event: StreamReset) -> None:
        st = self.streams.get(event.stream_id)
        if st is None:
            return
        waiter, body = st.waiter, st.body
        code = event.error_code
        self._finish(st)
        if body is not None:
            body.end(UpstreamClosed(f"upstream {self.pool.name!r} reset the stream ({_code(code)})"))
        elif waiter is not None and not waiter.done():
            if code == ErrorCodes.REFUSED_STREAM:
                waiter.set_exception(Retry())
            else:
                waiter.set_exception(
                    UpstreamClosed(f"upstream {self.pool.name!r} reset the stream ({_code(code)})")
                )

    def _on_window(self, sid: int) -> None:
        if not self.sending:
            return
        targets = list(self.sending.values()) if sid == 0 else [self.sending.get(sid)]
        for st in targets:
            if st is not None and st.out is not None:
                self._send_body(st)

    def _on_settings(self, event: RemoteSettingsChanged) -> None:
        changed = event.changed_settings.get(SettingCodes.MAX_CONCURRENT_STREAMS)
        if changed is not None:
            self.capacity = min(changed.new_value, 2**31)
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._on_window(0)
        if not self.ready.done():
            self.ready.set_result(None)
        self.pool.capacity_changed(self)

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        last = event.last_stream_id if event.last_stream_id is not None else 2**31
        if event.error_code:
            log.info("upstream %s sent GOAWAY %s", self.pool.name, _code(event.error_code))
        self.goaway = True
        for st in [s for s in self.streams.values() if s.sid > last]:
            waiter, body = st.waiter, st.body
            self._finish(st)
            if body is not None:
                body.end(UpstreamClosed(f"upstream {self.pool.name!r} went away mid-response"))
            elif waiter is not None and not waiter.done():
                waiter.set_exception(Retry())
        self.pool.went_away(self)
        if not self.streams:
            self.close()

    def _resolve_heads(self) -> None:
        heads, self._resolve = self._resolve, []
        for st in heads:
            waiter = st.waiter
            if waiter is None or waiter.done() or st.head is None:
                continue
            st.waiter = None
            if st.timer is not None:
                st.timer.cancel()
                st.timer = None
            status, headers, length = st.head
            early, st.early = st.early, []
            if st.ended and (length is not None or not early):
                for _, flow in early:
                    self.acknowledge(st.sid, flow)
                parts = [d for d, _ in early if d]
                self._finish(st)
                waiter.set_result((status, headers, parts[0] if len(parts) == 1 else b"".join(parts)))
                continue
            # Without a content-length a response is a stream even when it ended in this batch:
            # the client's framing never depends on how the frames fell into reads.
            body = H2Body(self, st.sid, length)
            st.body = body
            for data, flow in early:
                body.feed(data, flow)
            if st.ended:
                self._finish(st)
                body.end(None)
            else:
                st.active = False
                self._arm_read(st)
            waiter.set_result((status, headers, body))

    # -- timeouts --------------------------------------------------------------------------------
    def _head_timeout(self, st: _Stream) -> None:
        st.timer = None
        waiter = st.waiter
        self.cancel_stream(st.sid)
        if waiter is not None and not waiter.done():
            waiter.set_exception(UpstreamTimeout(f"upstream {self.pool.name!r} sent no response in time"))

    def _arm_read(self, st: _Stream) -> None:
        """Look again after the longest allowed gap between chunks, or at the total deadline."""
        st.timer = self.loop.call_at(
            min(self.loop.time() + self.pool.cfg.read_timeout_s, st.deadline), self._read_timeout, st
        )

    def _read_timeout(self, st: _Stream) -> None:
        st.timer = None
        body = st.body
        if body is not None and self.loop.time() >= st.deadline:
            self.cancel_stream(st.sid)
            body.end(UpstreamTimeout(f"upstream {self.pool.name!r} did not finish within total_timeout_s"))
            return
        if st.active or body is None or body.waiting:
            st.active = False
            self._arm_read(st)
            return
        self.cancel_stream(st.sid)
        body.end(UpstreamTimeout(f"upstream {self.pool.name!r} stalled mid-response"))

    def became_idle(self) -> None:
        self.idle_since = self.loop.time()
        self._arm(self.idle_since + self.pool.cfg.idle_timeout_s)

    def _ping(self) -> None:
        if self.ping_deadline == INF and not self.closed:
            with contextlib.suppress(ProtocolError):
                self.h2.ping(_PING)
            self.ping_deadline = self.loop.time() + self.pool.cfg.h2_ping_timeout_s
            self._arm(self.ping_deadline)

    def start_timer(self) -> None:
        self._arm(self.last_recv + self.pool.cfg.h2_ping_interval_s)

    def _arm(self, when: float) -> None:
        timer = self._timer
        if timer is None or timer.when() > when:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed:
            return
        cfg = self.pool.cfg
        now = self.loop.time()
        if self.ping_deadline <= now:
            log.warning("upstream %s: no answer to a PING; closing the connection", self.pool.name)
            self.close_for(UpstreamClosed(f"upstream {self.pool.name!r} stopped answering (PING)"))
            return
        if self.active == 0 and now >= self.idle_since + cfg.idle_timeout_s:
            self.goaway = True
            self.pool.went_away(self)
            self.close()
            return
        if now >= self.last_recv + cfg.h2_ping_interval_s:
            self._ping()
            self.flush()
        nearest = min(self.ping_deadline, self.last_recv + cfg.h2_ping_interval_s)
        if self.active == 0:
            nearest = min(nearest, self.idle_since + cfg.idle_timeout_s)
        self._arm(max(nearest, now + 0.001))

    # -- the connection --------------------------------------------------------------------------
    def _queued_flush(self) -> None:
        self._flush_queued = False
        self.flush()

    def flush(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        data = self.h2.data_to_send()
        if data:
            transport.write(data)

    def close(self) -> None:
        """Close gracefully (GOAWAY NO_ERROR); used when no stream is left."""
        if self.closed:
            return
        with contextlib.suppress(ProtocolError):
            self.h2.close_connection()
        self.flush()
        self.close_for(UpstreamClosed(f"upstream {self.pool.name!r} connection closed"), graceful=True)

    def close_for(self, exc: Exception, graceful: bool = False) -> None:
        """The connection is over: fail what is under way with ``exc`` and drop it."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        self.goaway = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            if graceful:
                self.transport.close()
            else:
                self.transport.abort()
        if not self.ready.done():
            self.ready.set_exception(exc)
            self.ready.exception()  # retrieved: waiters see it through the pool
        streams = list(self.streams.values())
        self.streams.clear()
        self.sending.clear()
        for st in streams:
            self._forget_closed(st, exc)
        self.pool.connection_lost(self)

    def _forget_closed(self, st: _Stream, exc: Exception) -> None:
        waiter, body = st.waiter, st.body
        if st.timer is not None:
            st.timer.cancel()
            st.timer = None
        st.waiter = None
        if body is not None:
            body.end(exc)
        elif waiter is not None and not waiter.done():
            # Nothing came back at all since the stream went out on a reused connection: like a
            # stale HTTP/1.1 keep-alive, it never reached the upstream.
            stale = st.recv_mark == self.reads and isinstance(exc, UpstreamClosed)
            waiter.set_exception(Retry() if stale else exc)


def _code(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return f"error {code}"
