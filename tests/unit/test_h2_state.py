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

from proxy.server.h2_state import LeanH2State

REQUEST = [(b":method", b"POST"), (b":path", b"/v1/x"), (b":scheme", b"http"), (b":authority", b"a")]


def _pair(server_class: type[H2Connection]) -> tuple[H2Connection, H2Connection]:
    """A client and a server with one request (stream 1) received, its body complete."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = server_class(H2Configuration(client_side=False, header_encoding=None))
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
        server = server_class(H2Configuration(client_side=False, header_encoding=None))
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
        server = server_class(H2Configuration(client_side=False, header_encoding=None))
        client.initiate_connection()
        server.initiate_connection()
        client.send_headers(1, [*REQUEST, (b"content-length", b"2")])
        client.send_data(1, b"abc", end_stream=True)
        with pytest.raises(ProtocolError):
            server.receive_data(client.data_to_send())
