"""h2's connection state machine with a shorter path for the frames every response sends.

A small response through h2's public API builds a ``HeadersFrame`` and a ``DataFrame`` object,
re-encodes every header name and value, builds header validation flags twice, checks hyperframe's
``Flags`` sets and serializes both frames; and every frame received is ``repr()``-ed for a trace log
that goes nowhere (some 5 µs a frame). :class:`LeanH2State` keeps h2's state machines, flow-control
windows and errors, and writes the common frames' bytes itself:

- ``send_headers`` of a final response on a stream h2 knows: the connection and stream state
  machines take the same inputs as in h2, the header block goes out as HEADERS (+ CONTINUATION when
  it exceeds the peer's frame size). Anything else (1xx, priority, an unknown stream) takes h2's way;
- ``send_data`` without padding and ``end_stream``: the same checks and window bookkeeping as h2, a
  9-byte frame header and the payload;
- the frame buffer (:class:`LeanFrameBuffer`): DATA and HEADERS frames without padding, priority or
  CONTINUATION parsed in a few lines, every other frame by h2;
- ``_receive_frame``: h2's, without the ``repr(frame)``;
- ``_receive_headers_frame`` of a request opening a stream: h2's steps (stream limit, HPACK, state
  machines, content-length) without its validation scaffolding, which is off anyway;
- ``_open_streams`` (called for every new stream to enforce SETTINGS_MAX_CONCURRENT_STREAMS, and to
  drop closed streams): below the limit the number of streams h2 holds is the answer (an upper
  bound, enough to admit one more), so the loop over them runs only at the limit: with 100 streams
  on a connection it was a loop of 100 per request.

These lean on h2 internals (``streams``, ``state_machine``, ``_data_to_send``, ``_closed_streams``,
``_frame_dispatch_table``, each stream's ``outbound_flow_control_window``), stable since h2 3;
tests/unit/test_h2_state.py checks the bytes against h2's own and fails if they go.
Only the server side uses it (proxy/server/h2.py).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any, cast

from h2.config import H2Configuration
from h2.connection import AllowedStreamIDs, ConnectionInputs, ConnectionState, H2Connection, _decode_headers
from h2.errors import ErrorCodes
from h2.events import Event, RequestReceived, StreamEnded
from h2.exceptions import ProtocolError, StreamClosedError, StreamIDTooLowError, TooManyStreamsError
from h2.frame_buffer import FrameBuffer
from h2.stream import STREAM_OPEN, H2Stream, H2StreamStateMachine, StreamInputs, StreamState
from hyperframe.flags import Flags
from hyperframe.frame import DataFrame, Frame, HeadersFrame, RstStreamFrame

_FRAME_HEADER = struct.Struct(">HBBBL")  # 24-bit length as 16 + 8 bits, type, flags, stream id
_DATA, _HEADERS, _CONTINUATION = 0x0, 0x1, 0x9
_END_STREAM, _END_HEADERS, _PADDED, _PRIORITY = 0x1, 0x4, 0x8, 0x20
_CLOSED = StreamState.CLOSED
_SERVER_OPEN = ConnectionState.SERVER_OPEN


def _frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _FRAME_HEADER.pack(length >> 8, length & 0xFF, kind, flags, stream_id)


class LeanFrameBuffer(FrameBuffer):
    """h2's frame buffer, with DATA and HEADERS frames (no padding, priority or CONTINUATION: what
    clients send) parsed here: no memoryview copies, no flag loop, no padding and priority parsers.
    Every other frame, and any frame while a header block is open, is h2's."""

    def __next__(self) -> Frame:
        data = self._data
        if len(data) < 9 or self._headers_buffer:
            return super().__next__()
        kind = data[3]
        flags = data[4]
        if kind == _DATA:
            plain = not flags & _PADDED
        else:
            plain = kind == _HEADERS and flags & (_PADDED | _PRIORITY | _END_HEADERS) == _END_HEADERS
        if not plain:
            return super().__next__()
        length = data[0] << 16 | data[1] << 8 | data[2]
        sid = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        if not sid:
            return super().__next__()  # h2 raises what it must
        end = 9 + length
        if len(data) < end:
            raise StopIteration
        self._validate_frame_length(length)
        # The frames are built as their constructors would (tests/unit/test_h2_state.py compares
        # their attributes with h2's), without building each one's set of valid flag names anew.
        frame: DataFrame | HeadersFrame
        if kind == _DATA:
            frame = DataFrame.__new__(DataFrame)
            frame.flags = _flags(_DATA_FLAGS, {"END_STREAM"} if flags & _END_STREAM else set())
        else:
            frame = HeadersFrame.__new__(HeadersFrame)
            frame.flags = _flags(
                _HEADERS_FLAGS, {"END_HEADERS", "END_STREAM"} if flags & _END_STREAM else {"END_HEADERS"}
            )
            frame.depends_on = 0
            frame.stream_weight = 0
            frame.exclusive = False
        frame.stream_id = sid
        frame.pad_length = 0
        frame.data = bytes(data[9:end])
        frame.body_len = length
        del data[:end]
        return frame


_DATA_FLAGS = frozenset(flag.name for flag in DataFrame.defined_flags)
_HEADERS_FLAGS = frozenset(flag.name for flag in HeadersFrame.defined_flags)


def _flags(valid: frozenset[str], present: set[str]) -> Flags:
    """``Flags(defined_flags)`` holding ``present``, with a shared set of the valid names."""
    out = Flags.__new__(Flags)
    out._valid_flags = valid  # type: ignore[assignment]  # only read (``in``) by Flags
    out._flags = present
    return out


def front_config() -> H2Configuration:
    """The HTTP/2 front's h2 configuration: h2's own header checks off, since
    ``proxy.server.h2_request`` makes them (in one pass) and :class:`LeanH2State`'s request path
    skips h2's."""
    return H2Configuration(
        client_side=False,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
        normalize_inbound_headers=False,
    )


class LeanH2State(H2Connection):
    """``h2.connection.H2Connection`` (server side) with the fast paths above."""

    def __init__(self, config: H2Configuration) -> None:
        if config.validate_inbound_headers or config.normalize_inbound_headers:
            # Its request path does not run h2's header checks: asking for them would be a lie.
            raise ValueError("LeanH2State checks no request headers: use front_config() and h2_request")
        super().__init__(config=config)
        self.incoming_buffer = LeanFrameBuffer(server=True)

    @property
    def outbound_bytes(self) -> int:
        """Bytes queued for ``data_to_send()``."""
        return len(self._data_to_send)

    def send_headers(
        self,
        stream_id: int,
        headers: Iterable[Any],
        end_stream: bool = False,
        priority_weight: int | None = None,
        priority_depends_on: int | None = None,
        priority_exclusive: bool | None = None,
    ) -> None:
        stream = self.streams.get(stream_id)
        fields = headers if isinstance(headers, list) else list(headers)
        if (
            stream is None
            or priority_weight is not None
            or priority_depends_on is not None
            or priority_exclusive is not None
            or not fields
            or fields[0][0] != b":status"
            or fields[0][1][:1] == b"1"  # informational: h2 has its own inputs for those
        ):
            super().send_headers(
                stream_id, fields, end_stream, priority_weight, priority_depends_on, priority_exclusive
            )
            return
        machine = self._sending(stream, ConnectionInputs.SEND_HEADERS, StreamInputs.SEND_HEADERS, end_stream)
        if not end_stream and machine.trailers_sent:
            raise ProtocolError("Trailers must have END_STREAM set.")
        block = self.encoder.encode(fields)
        size = len(block)
        limit = self.max_outbound_frame_size
        end = _END_STREAM if end_stream else 0
        out = self._data_to_send
        if size <= limit:
            out += _frame_header(size, _HEADERS, end | _END_HEADERS, stream_id)
            out += block
            return
        out += _frame_header(limit, _HEADERS, end, stream_id)
        out += block[:limit]
        for start in range(limit, size, limit):
            part = block[start : start + limit]
            last = start + limit >= size
            out += _frame_header(len(part), _CONTINUATION, _END_HEADERS if last else 0, stream_id)
            out += part

    def _sending(
        self, stream: H2Stream, conn_input: ConnectionInputs, stream_input: StreamInputs, end_stream: bool
    ) -> H2StreamStateMachine:
        """The state machines' transitions for a frame sent on ``stream``; its machine."""
        if self.state_machine.state is not _SERVER_OPEN:  # in SERVER_OPEN the input changes nothing
            self.state_machine.process_input(conn_input)
        machine = stream.state_machine
        machine.process_input(stream_input)
        if end_stream:
            machine.process_input(StreamInputs.SEND_END_STREAM)
        return machine

    def send_data(
        self, stream_id: int, data: bytes | memoryview, end_stream: bool = False, pad_length: Any = None
    ) -> None:
        stream = self.streams.get(stream_id)
        size = len(data)
        if (
            stream is None
            or pad_length is not None
            or size > self.max_outbound_frame_size
            or (size and size > min(self.outbound_flow_control_window, stream.outbound_flow_control_window))
        ):
            super().send_data(stream_id, data, end_stream, pad_length)  # h2 raises what it must
            return
        self._sending(stream, ConnectionInputs.SEND_DATA, StreamInputs.SEND_DATA, end_stream)
        stream.outbound_flow_control_window -= size
        self.outbound_flow_control_window -= size
        out = self._data_to_send
        out += _frame_header(size, _DATA, _END_STREAM if end_stream else 0, stream_id)
        out += data

    def end_stream(self, stream_id: int) -> None:
        self.send_data(stream_id, b"", end_stream=True)

    def _receive_frame(self, frame: Frame) -> list[Event]:
        # h2 4.x's _receive_frame, less its ``trace("Received frame: %s", repr(frame))``.
        events: list[Event]
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except StreamClosedError as e:
            # Closed by RST_STREAM: answer with RST_STREAM; otherwise a connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except StreamIDTooLowError as e:
            # A stream we no longer know: a stream error if we reset it, a connection error if it
            # ended normally (STREAM_CLOSED) or was closed implicitly (PROTOCOL_ERROR).
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events

    def _receive_headers_frame(self, frame: HeadersFrame) -> tuple[list[Frame], list[Event]]:
        # A request opening a new stream, without PRIORITY: h2's steps less the header validation
        # scaffolding (proxy/server/h2_request.py checks the fields) and the Flags lookups.
        # Trailers, PRIORITY and anything else take h2's way.
        sid = frame.stream_id
        flags = frame.flags
        if sid in self.streams or "PRIORITY" in flags:
            return super()._receive_headers_frame(frame)
        limit = self.local_settings.max_concurrent_streams
        held = self.open_inbound_streams
        if held + 1 > limit:
            raise TooManyStreamsError(f"Max inbound streams is {limit}, {held} open")
        headers = _decode_headers(self.decoder, frame.data)
        events: list[Event] = []  # in SERVER_OPEN, RECV_HEADERS changes nothing and says nothing
        if self.state_machine.state is not _SERVER_OPEN:
            events = self.state_machine.process_input(ConnectionInputs.RECV_HEADERS)
        stream = self._begin_new_stream(sid, AllowedStreamIDs.ODD)
        machine = stream.state_machine
        stream_events = machine.process_input(StreamInputs.RECV_HEADERS)
        request = cast(RequestReceived, stream_events[0])
        if "END_STREAM" in flags:
            ended = machine.process_input(StreamInputs.RECV_END_STREAM)
            request.stream_ended = cast(StreamEnded, ended[0])
            stream_events += ended
        stream._initialize_content_length(headers)
        request.headers = list(headers)
        return [], events + stream_events

    def _open_streams(self, remainder: int) -> int:
        streams = self.streams
        if remainder == 1 and len(streams) < self.local_settings.max_concurrent_streams:
            # Client streams, below our limit: at most len(streams) are open, which is all h2 asks
            # (is one more allowed?). Closed ones stay until the limit is reached, so at most that many.
            return len(streams)
        count = 0
        closed: list[int] = []
        open_states = STREAM_OPEN
        for stream_id, stream in self.streams.items():
            state = stream.state_machine.state
            if open_states[state] and stream_id % 2 == remainder:
                count += 1
            elif state == _CLOSED:
                closed.append(stream_id)
        for stream_id in closed:
            stream = self.streams.pop(stream_id)
            self._closed_streams[stream_id] = stream.closed_by
        return count
