"""The HTTP/2 front: an asyncio.Protocol around the h2 state machine (sans-IO).

This module is the connection: frames in, events to streams, timers, GOAWAY. Each stream
becomes the same :class:`~proxy.http.Request` the HTTP/1.1 front builds and runs through the same
chain in a task of its own; its :class:`~proxy.server.h2_stream.H2Stream` sends the response as
HEADERS and DATA frames within the client's flow-control windows, bounded per stream, with
backpressure to the upstream. A client that stops reading the socket gets no DATA until it
drains (``pause_writing``), so its streams fill up and pause too.

RST_STREAM from the client cancels the stream's task or aborts its upstream body, as an HTTP/1.1
disconnect does. :class:`~proxy.server.h2_guard.FrameGuard` looks at every frame header first and
closes abusive connections (CONTINUATION, control frame and Rapid Reset floods) with GOAWAY
ENHANCE_YOUR_CALM; h2 itself answers protocol errors with GOAWAY PROTOCOL_ERROR and friends.
Shutdown sends GOAWAY NO_ERROR with the last stream id and lets the streams under way finish.

Data is flushed once per batch of received frames, and otherwise once per loop iteration
(``flush_soon``): responses and chunks that become ready together leave in one write.

The h2 state machine is h2's with shorter paths for the frames every request and response uses
(proxy/server/h2_state.py); request headers are HPACK-decoded by h2_decoder.py and checked and
split by h2_request.py (h2's own validation is off); headers are encoded by
proxy/h2/hpack_encoder.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, cast

from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import NoSuchStreamError, ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hpack.exceptions import HPACKError
from hyperframe.frame import GoAwayFrame

from proxy.config import Http2Config
from proxy.errors import PayloadTooLarge, ProxyError, RequestTimeout
from proxy.h2.hpack_encoder import StaticEncoder
from proxy.server.h2_decoder import FastDecoder
from proxy.server.h2_guard import ENHANCE_YOUR_CALM, FrameGuard, Violation
from proxy.server.h2_request import MalformedHeaders, check_trailers, split_request
from proxy.server.h2_state import LeanH2State, front_config
from proxy.server.h2_stream import INF, H2Stream

if TYPE_CHECKING:
    from hpack import Decoder, Encoder

    from proxy.server.front import Front

log = logging.getLogger("llm_sidecar.front")

# After a GOAWAY for an error: half-close and drop what the client still sends for this long, then
# abort. Closing with unread input makes the kernel send a reset, which can destroy the GOAWAY
# before the client reads it (a lingering close, as nginx does).
LINGER_S = 1.0
# flush_soon() writes at once when this much is queued in h2 (a big stream, not small responses).
FLUSH_NOW_BYTES = 64 * 1024


def describe(e: ProtocolError) -> str:
    """What was wrong, for the log: some of h2's errors print as their stream id alone."""
    if isinstance(e, StreamClosedError):
        return f"a frame on stream {e.stream_id}, which is closed (StreamClosedError)"
    if isinstance(e, NoSuchStreamError):
        return f"a frame on stream {e.stream_id}, which does not exist (NoSuchStreamError)"
    text = str(e)
    return f"{text} ({type(e).__name__})" if text else type(e).__name__


class H2Connection(asyncio.Protocol):
    def __init__(self, front: Front, cfg: Http2Config) -> None:
        self.front = front
        self.loop = front.loop
        self.limits = front.limits
        self.cfg = cfg
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.closed = False
        # Response headers are ours, lower-case and without connection-specific fields
        # (_RESPONSE_DROP): h2 need not check them again. Request headers are checked in full by
        # h2_request.split_request, in the pass that picks them apart, not by h2's generators.
        self.h2 = h2 = LeanH2State(config=front_config())
        h2.encoder = cast("Encoder", StaticEncoder())
        h2.decoder = cast("Decoder", FastDecoder(cfg.max_header_list_size))
        h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: cfg.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: cfg.max_header_list_size,
                SettingCodes.INITIAL_WINDOW_SIZE: cfg.initial_window_size,
            },
        )
        self.guard = FrameGuard(cfg, front.clock)
        self.streams: dict[int, H2Stream] = {}
        self.blocked: dict[H2Stream, None] = {}  # streams with pending data, in arrival order
        self.in_batch = False  # handling received frames: flush once at the end
        self._flush_pending = False  # flush_soon() has a callback queued
        self.write_paused = False
        self._goaway_last: int | None = None  # GOAWAY sent: streams above this id are refused
        self._dying = False  # closing for an error: nothing more is read
        self._idle_at = INF  # no stream open: the connection closes then
        self._header_at = INF  # a header block spans reads: it must be complete by then
        self._timer: asyncio.TimerHandle | None = None
        # Request bodies held by this connection's streams, and the DATA not acknowledged while
        # that is above the bound (the client's windows then close: it stops sending).
        self.body_held = 0
        self.body_bound = max(cfg.max_buffered_body_bytes, front.limits.max_body_bytes)
        self._unacked: list[tuple[int, int]] = []

    # -- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = t = cast(asyncio.Transport, transport)
        peer = self.front.admit(self, t)
        if peer is None:
            self.closed = True
            return
        self.peer = peer
        self.h2.initiate_connection()
        extra = self.cfg.connection_window_size - 65535
        if extra > 0:
            self.h2.increment_flow_control_window(extra)
        self.flush()
        self._became_idle()

    def data_received(self, data: bytes) -> None:
        if self._dying or self.closed:
            return
        violation = self.guard.feed(data)
        if violation is not None:
            self._die(violation)
            return
        try:
            events = self.h2.receive_data(data)
        except ProtocolError as e:  # h2 has queued the GOAWAY with the right code
            log.info("HTTP/2 protocol error from %s: %s", self.peer, describe(e))
            if type(e) is ProtocolError and isinstance(e.__cause__, HPACKError):
                self._replace_goaway(ErrorCodes.COMPRESSION_ERROR)  # RFC 9113 §4.3; h2 says PROTOCOL_ERROR
            self._die(None)
            return
        self.in_batch = True
        try:
            for event in events:
                kind = type(event)
                if kind is RequestReceived:
                    self._on_request(cast(RequestReceived, event))
                elif kind is DataReceived:
                    self._on_data(cast(DataReceived, event))
                elif kind is StreamEnded:
                    self._on_stream_ended(cast(StreamEnded, event).stream_id)
                elif kind is WindowUpdated:
                    self._on_window_update(cast(WindowUpdated, event).stream_id)
                elif kind is StreamReset:
                    self._on_reset(cast(StreamReset, event).stream_id)
                elif kind is RemoteSettingsChanged:
                    changed = cast(RemoteSettingsChanged, event).changed_settings
                    if SettingCodes.INITIAL_WINDOW_SIZE in changed:
                        self._on_window_update(0)
                elif kind is ConnectionTerminated:
                    self._on_goaway(cast(ConnectionTerminated, event))
                elif kind is TrailersReceived:
                    self._on_trailers(cast(TrailersReceived, event))
                if self._dying:
                    return
        except Exception:
            log.exception("bug while handling HTTP/2 frames from %s", self.peer)
            self._die(Violation(ErrorCodes.INTERNAL_ERROR, "internal error"))
            return
        finally:
            self.in_batch = False
        self.flush()
        if self.guard.in_header_block:  # a header block spans reads: it gets the header timeout
            if self._header_at == INF:
                self._header_at = self.loop.time() + self.limits.header_timeout_s
                self.arm(self._header_at)
        else:
            self._header_at = INF

    def eof_received(self) -> bool | None:
        if self._dying:
            self.abort()  # the lingering close is over: the client has read our GOAWAY and left
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.front.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for st in streams:
            st.cancel()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._on_window_update(0)
        self.flush()

    # -- frames from the client ------------------------------------------------------------------
    def _on_request(self, event: RequestReceived) -> None:
        sid = event.stream_id
        if self._goaway_last is not None and sid > self._goaway_last:
            self._refuse(sid)  # after our GOAWAY: the client may retry it elsewhere
            return
        if len(self.streams) >= self.cfg.max_concurrent_streams:
            # h2 holds the client to the limit, so this only happens while streams the client
            # reset are still unwinding: refuse, and count it as one more reset.
            self._refuse(sid)
            violation = self.guard.note_reset()
            if violation is not None:
                self._die(violation)
            return
        try:
            method, path, headers = split_request(event.headers or ())
        except MalformedHeaders as e:
            self._die(Violation(ErrorCodes.PROTOCOL_ERROR, f"malformed request headers: {e}"))
            return
        st = H2Stream(self, sid, method.decode("latin-1"), path, headers)
        self.streams[sid] = st
        self._idle_at = INF
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            st.answer_early(self._too_large())
        elif event.stream_ended is None:
            st.deadline = self.loop.time() + self.limits.body_timeout_s
            self.arm(st.deadline)

    def _on_trailers(self, event: TrailersReceived) -> None:
        try:
            check_trailers(event.headers or ())
        except MalformedHeaders as e:
            self._die(Violation(ErrorCodes.PROTOCOL_ERROR, f"malformed trailers: {e}"))

    def _refuse(self, sid: int) -> None:
        # Events come after h2 has read the whole batch: the client may have reset it already.
        with contextlib.suppress(StreamClosedError):
            self.h2.reset_stream(sid, ErrorCodes.REFUSED_STREAM)

    def _on_data(self, event: DataReceived) -> None:
        sid = event.stream_id
        st = self.streams.get(sid)
        data = event.data
        flow = event.flow_controlled_length
        if st is None or st.responding or not data:
            if flow:
                self.h2.acknowledge_received_data(flow, sid)
            return
        st.body_bytes += len(data)
        self.body_held += len(data)
        if flow:
            if self.body_held <= self.body_bound or self._oldest_receiving(st):
                self.h2.acknowledge_received_data(flow, sid)
            else:  # over the bound: the window stays shut until requests complete
                self._unacked.append((sid, flow))
        if st.body_bytes > self.limits.max_body_bytes:
            st.answer_early(self._too_large())
            return
        st.body.append(data)

    def _oldest_receiving(self, st: H2Stream) -> bool:
        """The lowest stream still sending its body is always let through, so one body can
        always complete however the others filled the bound (it is at most max_body_bytes)."""
        return all(o.sid >= st.sid for o in self.streams.values() if not o.request_done and not o.responding)

    def _release_body(self, st: H2Stream) -> None:
        """A stream is gone: its body no longer counts; below the bound, withheld acks go out."""
        self.body_held -= st.body_bytes
        st.body_bytes = 0
        if self._unacked and self.body_held <= self.body_bound:
            unacked, self._unacked = self._unacked, []
            for sid, flow in unacked:
                self.h2.acknowledge_received_data(flow, sid)
            if not self.in_batch:
                self.flush()

    def _on_stream_ended(self, sid: int) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        st.request_done = True
        if st.responding:
            self.forget_if_done(st)
            return
        self._dispatch(st)

    def _on_window_update(self, sid: int) -> None:
        if sid == 0:
            for blocked in list(self.blocked):
                blocked.send_pending()
        else:
            st = self.streams.get(sid)
            if st is not None and st in self.blocked:
                st.send_pending()
        if not self.in_batch:
            self.flush()

    def _on_reset(self, sid: int) -> None:
        st = self.streams.get(sid)
        if st is None:
            return
        in_flight = st.in_flight
        st.cancel()
        self.forget_if_done(st)
        if in_flight:
            violation = self.guard.note_reset()
            if violation is not None:
                self._die(violation)

    def _on_goaway(self, event: ConnectionTerminated) -> None:
        if event.error_code:
            log.info("client %s closed the connection with HTTP/2 error %s", self.peer, event.error_code)
            self._die(None)
            return
        if self._goaway_last is None:
            self._goaway_last = self.h2.highest_inbound_stream_id
        if not self.streams:
            self._close()

    # -- answering -------------------------------------------------------------------------------
    def _dispatch(self, st: H2Stream) -> None:
        """The request is complete: build it, and answer it in a task of its own (H2Stream.respond)."""
        st.responding = True
        st.deadline = INF
        driver = self.front.driver
        headers = st.headers
        body = st.body
        st.request = request = driver.request(
            st.method,
            st.path,
            headers,
            body[0] if len(body) == 1 else b"".join(body),
            self.peer,
            headers.get(b"x-request-id"),
        )
        st.body = []
        local = driver.local_answer(request)
        if local is not None:
            st.send_whole(local)
            return
        st.task = self.loop.create_task(st.respond(request))

    def forget_if_done(self, st: H2Stream) -> None:
        """Drop a stream once both sides are done (or it was reset) and its task has returned."""
        if st.task is not None or st.producer is not None:
            return
        if not (st.reset or (st.ended and st.request_done)):
            return
        if self.streams.pop(st.sid, None) is None:
            return
        if st.request is not None:
            self.front.driver.done(st.request)
        self.blocked.pop(st, None)
        if st.body_bytes:
            self._release_body(st)
        if not self.streams:
            if self._goaway_last is not None:
                self._close()
            else:
                self._became_idle()

    def flush_soon(self) -> None:
        """Flush once the loop has run what is ready now: the responses that complete in one loop
        iteration (upstream answers read by one poll) leave in one write to the socket. Past
        FLUSH_NOW_BYTES it flushes at once, so a client that stops reading pauses the writers
        (``pause_writing``) before more than that piles up."""
        if self.h2.outbound_bytes >= FLUSH_NOW_BYTES:
            self.flush()
        elif not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush_queued)

    def _flush_queued(self) -> None:
        self._flush_pending = False
        self.flush()

    def flush(self) -> None:
        transport = self.transport
        if transport is None or self.closed:
            return
        data = self.h2.data_to_send()
        if data:
            transport.write(data)
            if self.write_paused and transport.get_write_buffer_size() > self.cfg.max_send_buffer_bytes:
                log.info("HTTP/2 client %s stopped reading; closing", self.peer)
                self.abort()

    # -- connection management -------------------------------------------------------------------
    def close_when_idle(self) -> None:
        """Graceful shutdown: GOAWAY NO_ERROR naming the last stream we take; those finish."""
        if self.closed or self.transport is None:
            return
        if self._goaway_last is None:
            self._goaway_last = last = self.h2.highest_inbound_stream_id
            self.flush()
            self.transport.write(GoAwayFrame(0, last_stream_id=last, error_code=0).serialize())
        if not self.streams:
            self._close()

    def cut(self, err: ProxyError) -> int:
        """The drain ran out (see ClientConnection.cut): every stream under way ends with ``err``."""
        if self.closed or self.transport is None:
            return 0
        under_way = [st for st in self.streams.values() if st.in_flight]
        self.in_batch = True  # one flush for all of them
        try:
            for st in under_way:
                st.cut(err)
        finally:
            self.in_batch = False
        self._close()
        return len(under_way)

    def _die(self, violation: Violation | None) -> None:
        """Close for an error: GOAWAY (``violation``'s code, or the one h2 queued), then the socket."""
        if self._dying:
            return
        self._dying = True
        if violation is not None:
            log.warning("HTTP/2 client %s: %s; closing", self.peer, violation.reason)
            try:
                self.h2.close_connection(error_code=violation.error_code, additional_data=b"")
            except ProtocolError:  # h2 had already closed: write the frame ourselves
                frame = GoAwayFrame(
                    0, last_stream_id=self.h2.highest_inbound_stream_id, error_code=violation.error_code
                )
                if self.transport is not None:
                    self.transport.write(frame.serialize())
        self.flush()
        streams = list(self.streams.values())
        self.streams.clear()
        self.blocked.clear()
        for st in streams:
            st.cancel()
        transport = self.transport
        if transport is not None and not self.closed:
            if transport.can_write_eof():
                transport.write_eof()  # FIN after the GOAWAY; data_received drops what still comes
            else:
                transport.close()
            self.loop.call_later(LINGER_S, self.abort)

    def _replace_goaway(self, error_code: int) -> None:
        """Send what h2 queued, but with our own GOAWAY instead of the one h2 put last."""
        data = self.h2.data_to_send()
        if data[-17:-14] == b"\x00\x00\x08" and data[-14] == 0x7:  # an 8-byte GOAWAY frame
            data = data[:-17]
        goaway = GoAwayFrame(0, last_stream_id=self.h2.highest_inbound_stream_id, error_code=error_code)
        if self.transport is not None:
            self.transport.write(data + goaway.serialize())

    def _close(self) -> None:
        if self.transport is not None and not self.closed:
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    # -- timeouts --------------------------------------------------------------------------------
    def _became_idle(self) -> None:
        self._idle_at = self.loop.time() + self.cfg.idle_timeout_s
        self.arm(self._idle_at)

    def arm(self, when: float) -> None:
        timer = self._timer
        if timer is None or timer.when() > when:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed or self._dying:
            return
        now = self.loop.time()
        if self._header_at <= now:
            self._die(Violation(ENHANCE_YOUR_CALM, "a header block took too long (limits.header_timeout_s)"))
            return
        if not self.streams and now >= self._idle_at:
            self.close_when_idle()  # GOAWAY NO_ERROR, then close
            return
        nearest = min(self._idle_at if not self.streams else INF, self._header_at)
        for st in list(self.streams.values()):
            if st.deadline <= now:
                st.answer_early(RequestTimeout("the client took too long to send the request body"))
            elif st.stalled_at <= now:
                self._stalled(st)
            else:
                nearest = min(nearest, st.deadline, st.stalled_at)
        self.flush()
        if nearest < INF:
            self.arm(nearest)

    def _stalled(self, st: H2Stream) -> None:
        """The client let nothing of this response through for ``http2.send_timeout_s``."""
        log.info("HTTP/2 client %s took no data on stream %d for %g s; resetting it", self.peer, st.sid,
                 self.cfg.send_timeout_s)  # fmt: skip
        st.reset_by_us(ErrorCodes.CANCEL)
        self.forget_if_done(st)

    def _too_large(self) -> PayloadTooLarge:
        return self.front.driver.too_large()
