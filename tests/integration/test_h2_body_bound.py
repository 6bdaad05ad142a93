"""The HTTP/2 front bounds the request body bytes one connection holds
(``http2.max_buffered_body_bytes``): above it, received DATA is not acknowledged, so the client's
windows close and it stops sending; the acknowledgements go out as requests complete."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.h2_raw import RawH2
from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config

BOUND = 65536
WINDOW = 65535
EXTRA = (
    f"limits: {{max_body_bytes: {BOUND}}}\n"
    f"http2: {{max_buffered_body_bytes: {BOUND}, connection_window_size: {WINDOW}, "
    f"initial_window_size: {WINDOW}}}\n"
)
HEAD = [
    (b":method", b"POST"),
    (b":path", b"/v1/chat/completions"),
    (b":scheme", b"http"),
    (b":authority", b"sidecar"),
    (b"content-type", b"application/json"),
]


@pytest.fixture(scope="module")
def sidecar(mock: MockProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    with SidecarProcess(minimal_config(mock.url, extra=EXTRA), tmp_path_factory.mktemp("bound")) as proc:
        yield proc


def open_stream(client: RawH2) -> int:
    sid: int = client.conn.get_next_available_stream_id()
    client.conn.send_headers(sid, HEAD)
    return sid


def send_some(client: RawH2, sid: int, want: int) -> int:
    """Send up to ``want`` bytes on ``sid`` as the windows allow, reading the server's frames for a
    while when they are shut; returns how many went."""
    sent = 0
    idle_reads = 0
    while sent < want and idle_reads < 3:
        room = min(
            client.conn.local_flow_control_window(sid), client.conn.max_outbound_frame_size, want - sent
        )
        if room > 0:
            client.conn.send_data(sid, b"x" * room)
            client.flush()
            sent += room
            idle_reads = 0
        else:
            idle_reads += 0 if client.pump(0.2) else 1
    return sent


def test_a_connection_over_the_bound_stops_being_acknowledged_until_requests_complete(
    sidecar: SidecarProcess,
) -> None:
    with RawH2(sidecar.host, sidecar.port) as client:
        oldest = open_stream(client)
        client.conn.send_data(
            oldest, b'{"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]'
        )
        client.flush()
        each = 30_000
        sent: dict[int, int] = {}
        for _ in range(10):
            sid = open_stream(client)
            sent[sid] = send_some(client, sid, each)
            if sent[sid] < each:
                break
        total = sum(sent.values())
        # What the client could send: the bound, plus the window it had when the sidecar stopped.
        assert total <= BOUND + WINDOW + 16384, sent
        assert total < 10 * each
        full = [sid for sid, n in sent.items() if n == each]
        for sid in full:  # complete those requests (their bodies are not JSON: 400 at once)
            client.conn.end_stream(sid)
        client.flush()
        for sid in full:
            assert client.response(sid)[0] == 400
        # Their bytes no longer count: the withheld acknowledgements went out, the rest can go.
        last = max(sent)
        assert send_some(client, last, each - sent[last]) == each - sent[last]
        client.conn.end_stream(last)
        client.conn.send_data(oldest, b"}", end_stream=True)
        client.flush()
        assert client.response(last)[0] == 400
        assert client.response(oldest)[0] == 200  # the oldest body, complete at last: a chat answered


def test_one_body_always_completes_and_a_body_over_the_limit_still_gets_413(
    sidecar: SidecarProcess,
) -> None:
    with RawH2(sidecar.host, sidecar.port) as client:
        sid = open_stream(client)
        sent = send_some(client, sid, BOUND + 4096)  # beyond the connection window: acks must come
        assert sent > WINDOW
        assert client.response(sid)[0] == 413
