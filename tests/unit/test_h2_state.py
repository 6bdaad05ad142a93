"""LeanH2State (proxy/server/h2_state.py): the same bytes, states and errors as h2's H2Connection."""

from __future__ import annotations

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, RequestReceived, ResponseReceived, StreamEnded
from h2.exceptions import FlowControlError, FrameTooLargeError, ProtocolError, StreamClosedError
from h2.stream import StreamState
from hpack import Encoder
from hyperframe.frame import HeadersFrame

from proxy.server.h2_state import LeanH2State, front_config

REQUEST = [(b":method", b"POST"), (b":path", b"/v1/x"), (b":scheme", b"http"), (b":authority", b"a")]


def _pair(server_class: type[H2Connection]) -> tuple[H2Connection, H2Connection]:
    """A client and a server with one request (stream 1) received, its body complete."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = server_class(front_config())
    client.initiate_connection()
    server.initiate_connection()
    client.send_headers(1, REQUEST)
    client.send_data(1, b"{}", end_stream=True)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    return client, server


def _both() -> list[tuple[H2Connection, H2Connection]]:
    return [_pair(H2Connection), _pair(LeanH2State)]


@pytest.mark.parametrize("extra", [0, 20_000], ids=["one-frame", "continuation"])
def test_a_whole_response_is_the_same_bytes_as_h2s(extra: int) -> None:
    headers = [(b":status", b"200"), (b"content-type", b"application/json"), (b"x-big", b"v" * extra)]
    out = []
    for client, server in _both():
        server.send_headers(1, headers)
        server.send_data(1, b'{"ok":true}', end_stream=True)
        data = server.data_to_send()
        out.append(data)
        events = client.receive_data(data)
        assert [type(e) for e in events] == [ResponseReceived, DataReceived, StreamEnded]
        assert server.streams[1].state_machine.state == StreamState.CLOSED
    assert out[0] == out[1]


def test_headers_with_end_stream_and_a_later_end_stream_match_h2() -> None:
    outs = []
    for client, server in _both():
        server.send_headers(1, [(b":status", b"204")], end_stream=True)
        outs.append(server.data_to_send())
        assert server.streams[1].state_machine.state == StreamState.CLOSED
        client.receive_data(outs[-1])
    assert outs[0] == outs[1]
    outs = []
    for client, server in _both():
        server.send_headers(1, [(b":status", b"200")])
        server.send_data(1, memoryview(b"abcdef")[2:])
        server.end_stream(1)
        outs.append(server.data_to_send())
        assert [type(e) for e in client.receive_data(outs[-1])] == [
            ResponseReceived,
            DataReceived,
            DataReceived,  # the empty DATA frame that ends the stream
            StreamEnded,
        ]
    assert outs[0] == outs[1]


def test_windows_are_kept_as_h2_keeps_them() -> None:
    for _, server in _both():
        server.send_headers(1, [(b":status", b"200")])
        before = server.local_flow_control_window(1)
        server.send_data(1, b"x" * 1000)
        assert server.local_flow_control_window(1) == before - 1000
        assert server.outbound_flow_control_window == 65535 - 1000


def test_errors_are_h2s() -> None:
    for _, server in _both():
        server.send_headers(1, [(b":status", b"200")])
        with pytest.raises(FrameTooLargeError):
            server.send_data(1, b"x" * 20_000)
        for _ in range(3):
            server.send_data(1, b"x" * 16_384)
        with pytest.raises(FlowControlError):
            server.send_data(1, b"x" * 16_384)  # 65,535 is the window
        with pytest.raises(ProtocolError):
            server.send_headers(1, [(b":status", b"200")])  # trailers without END_STREAM
        server.send_data(1, b"", end_stream=True)
        with pytest.raises(StreamClosedError):
            server.send_data(1, b"late")
        with pytest.raises(StreamClosedError):
            server.send_headers(1, [(b":status", b"200")], end_stream=True)


def test_closed_streams_are_dropped_by_the_time_the_stream_limit_is_reached() -> None:
    client, server = _pair(LeanH2State)
    limit = server.local_settings.max_concurrent_streams
    server.send_headers(1, [(b":status", b"200")], end_stream=True)
    for sid in range(3, 2 * (2 * limit) + 3, 2):  # twice the limit, one after the other
        client.send_headers(sid, REQUEST, end_stream=True)
        server.receive_data(client.data_to_send())
        server.send_headers(sid, [(b":status", b"200")], end_stream=True)
        client.receive_data(server.data_to_send())
        assert len(server.streams) <= limit
    assert server.open_inbound_streams <= limit


def test_the_stream_limit_still_holds() -> None:
    _, server = _pair(LeanH2State)
    limit = server.local_settings.max_concurrent_streams
    encoder = Encoder()  # the h2 client would not break the limit: raw frames
    frames = b"".join(
        HeadersFrame(sid, data=encoder.encode(REQUEST), flags=["END_HEADERS"]).serialize()
        for sid in range(3, 2 * limit + 3, 2)  # stream 1 is half-closed: these make limit + 1 open
    )
    with pytest.raises(ProtocolError, match="Max inbound streams"):
        server.receive_data(frames)


@pytest.mark.parametrize("end", [True, False])
def test_a_request_gives_h2s_events(end: bool) -> None:
    seen = []
    for server_class in (H2Connection, LeanH2State):
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        server = server_class(front_config())
        client.initiate_connection()
        server.initiate_connection()
        client.send_headers(1, [*REQUEST, (b"content-length", b"0" if end else b"2")], end_stream=end)
        events = server.receive_data(client.data_to_send())
        request = next(e for e in events if isinstance(e, RequestReceived))
        seen.append(([type(e).__name__ for e in events], request.headers, request.stream_ended is not None))
    assert seen[0] == seen[1]


def test_a_body_longer_than_its_content_length_is_refused() -> None:
    for server_class in (H2Connection, LeanH2State):
        client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        server = server_class(front_config())
        client.initiate_connection()
        server.initiate_connection()
        client.send_headers(1, [*REQUEST, (b"content-length", b"2")])
        client.send_data(1, b"abc", end_stream=True)
        with pytest.raises(ProtocolError):
            server.receive_data(client.data_to_send())


def _frames() -> bytes:
    from hyperframe.frame import ContinuationFrame, DataFrame, PingFrame, SettingsFrame, WindowUpdateFrame

    out = [
        SettingsFrame(0, settings={4: 65535}),
        HeadersFrame(1, data=b"h" * 30, flags=["END_HEADERS"]),
        DataFrame(1, data=b"d" * 100),
        DataFrame(1, data=b"p" * 10, flags=["PADDED", "END_STREAM"], pad_length=5),
        HeadersFrame(3, data=b"x" * 10, flags=["END_HEADERS", "END_STREAM", "PRIORITY"], depends_on=1),
        HeadersFrame(5, data=b"a" * 10),
        ContinuationFrame(5, data=b"b" * 10, flags=["END_HEADERS"]),
        PingFrame(0, opaque_data=b"12345678"),
        HeadersFrame(7, data=b"y" * 10, flags=["END_HEADERS", "END_STREAM"]),
        DataFrame(9, data=b"", flags=["END_STREAM"]),
        WindowUpdateFrame(0, window_increment=10),
    ]
    return b"".join(f.serialize() for f in out)


@pytest.mark.parametrize("chunk", [1, 7, 9, 64, 100_000])
def test_the_lean_frame_buffer_yields_h2s_frames(chunk: int) -> None:
    from h2.frame_buffer import FrameBuffer

    from proxy.server.h2_state import LeanFrameBuffer

    data = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _frames()
    seen = []
    for buffer in (FrameBuffer(server=True), LeanFrameBuffer(server=True)):
        buffer.max_frame_size = 16384
        frames = []
        for i in range(0, len(data), chunk):
            buffer.add_data(data[i : i + chunk])
            frames += [
                (type(f).__name__, sorted(f.flags), sorted(f.flags._valid_flags),
                 {k: v for k, v in vars(f).items() if k != "flags"},
                 getattr(f, "flow_controlled_length", None))
                for f in buffer
            ]  # fmt: skip
        seen.append(frames)
    assert seen[0] == seen[1]
    assert len(seen[1]) == 10  # the CONTINUATION joined to its HEADERS


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"\x00\x40\x01\x00\x00\x00\x00\x00\x01" + b"x" * 16385, "FrameTooLargeError"),  # over max frame size
        (b"\x00\x00\x01\x00\x01\x00\x00\x00\x00x", "ProtocolError"),  # DATA on stream 0
    ],
)
def test_the_lean_frame_buffer_refuses_what_h2_refuses(raw: bytes, error: str) -> None:
    from h2.frame_buffer import FrameBuffer

    from proxy.server.h2_state import LeanFrameBuffer

    for buffer in (FrameBuffer(), LeanFrameBuffer()):
        buffer.max_frame_size = 16384
        buffer.add_data(raw)
        with pytest.raises(ProtocolError) as caught:
            list(buffer)
        assert error in [c.__name__ for c in type(caught.value).__mro__]


def test_the_lean_state_refuses_a_config_that_asks_for_h2s_header_checks() -> None:
    with pytest.raises(ValueError, match="checks no request headers"):
        LeanH2State(H2Configuration(client_side=False, header_encoding=None))
