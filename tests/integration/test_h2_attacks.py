"""HTTP/2 abuse against the real sidecar subprocess: each attack ends with the GOAWAY code it
deserves, the sidecar keeps serving other connections, and its memory stays flat (VmRSS of the
process, before and after, within a small margin).

The attacker is a raw socket: h2 (client side) writes what is valid protocol, hyperframe what h2
would refuse to send (a CONTINUATION flood); the answer is read as raw frames.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, HeadersFrame, SettingsFrame

from tests.integration.h2_raw import PREFACE, RawH2, closed_after, read_goaway
from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config

CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]}
# Memory may move a little (allocator arenas, the first use of a code path); a leak under a flood
# of thousands of frames or a buffered stream of tens of MB would be far above this.
RSS_MARGIN_KB = 8 * 1024


def rss_kb(sidecar: SidecarProcess) -> int:
    assert sidecar.proc is not None
    status = Path(f"/proc/{sidecar.proc.pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1])


def still_serves(sidecar: SidecarProcess) -> None:
    """Another connection, HTTP/2 and HTTP/1.1, gets its answer."""
    with httpx.Client(http1=False, http2=True, timeout=5) as client:
        assert client.post(f"{sidecar.base_url}/chat/completions", json=CHAT).status_code == 200
    assert httpx.get(f"{sidecar.base_url}/models", timeout=5).status_code == 200


def send_all(sock: socket.socket, data: bytes) -> None:
    """Send until done or the sidecar closes on us (it may stop reading mid-flood)."""
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)


@pytest.fixture(scope="module")
def sidecar(mock: MockProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """The default limits (1000 control frames and 200 resets per 10 s, 128 KiB header blocks)."""
    with SidecarProcess(minimal_config(mock.url), tmp_path_factory.mktemp("h2-attacks")) as proc:
        still_serves(proc)  # warm up the code paths the attacks go through
        with RawH2(proc.host, proc.port) as c:
            c.json(c.request("POST", "/v1/chat/completions", CHAT))
        yield proc


@pytest.fixture(autouse=True)
def _fresh_mock(mock: MockProcess) -> None:
    mock.reset()


@pytest.fixture
def memory(sidecar: SidecarProcess) -> Iterator[None]:
    before = rss_kb(sidecar)
    yield
    after = rss_kb(sidecar)
    print(f"VmRSS {before} -> {after} kB")
    assert after - before < RSS_MARGIN_KB, f"VmRSS grew from {before} to {after} kB"


# ---- floods of control frames ----------------------------------------------------------------


def _pings(c: RawH2) -> None:
    for i in range(20_000):
        c.conn.ping(i.to_bytes(8, "big"))


def _settings(c: RawH2) -> None:
    for i in range(20_000):
        c.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 65535 + i % 2})


def _window_updates(c: RawH2) -> None:
    for _ in range(20_000):
        c.conn.increment_flow_control_window(1)


def _priorities(c: RawH2) -> None:
    for _ in range(20_000):
        c.conn.prioritize(1, weight=16)


def _empty_data(c: RawH2) -> None:
    sid = c.request("POST", "/v1/chat/completions", end=False, headers={"content-type": "application/json"})
    for _ in range(20_000):
        c.conn.send_data(sid, b"")


@pytest.mark.parametrize(
    "flood",
    [_pings, _settings, _window_updates, _priorities, _empty_data],
    ids=["ping", "settings", "window_update", "priority", "empty_data"],
)
def test_control_frame_flood_gets_enhance_your_calm(
    sidecar: SidecarProcess, memory: None, flood: Callable[[RawH2], None]
) -> None:
    with RawH2(sidecar.host, sidecar.port) as c:
        flood(c)
        send_all(c.sock, c.conn.data_to_send())  # in one go, without reading a byte
        assert read_goaway(c.sock) == (ErrorCodes.ENHANCE_YOUR_CALM, c.conn.highest_outbound_stream_id or 0)
        assert closed_after(c.sock)
    sidecar.wait_log("control frame flood")
    still_serves(sidecar)


def test_continuation_flood_gets_enhance_your_calm(sidecar: SidecarProcess, memory: None) -> None:
    """A header block that never ends: closed at 128 KiB, long before h2 would have buffered it."""
    block = Encoder().encode(
        [(":method", "GET"), (":path", "/v1/models"), (":scheme", "http"), (":authority", "x")]
    )
    with socket.create_connection((sidecar.host, sidecar.port), timeout=5) as sock:
        send_all(sock, PREFACE + SettingsFrame(0).serialize() + HeadersFrame(1, block).serialize())
        piece = ContinuationFrame(1, b"x-filler: " + b"y" * 16_000).serialize()
        for _ in range(200):  # 3.2 MB if nothing stopped it
            send_all(sock, piece)
        assert read_goaway(sock) == (ErrorCodes.ENHANCE_YOUR_CALM, 0)
    sidecar.wait_log("header block over 131072 bytes")
    still_serves(sidecar)


# ---- Rapid Reset (CVE-2023-44487) ------------------------------------------------------------


def test_rapid_reset_gets_enhance_your_calm(sidecar: SidecarProcess, mock: MockProcess, memory: None) -> None:
    slow = {"x-mock-first-byte-ms": "2000"}  # each request would hold the backend for 2 s
    with RawH2(sidecar.host, sidecar.port) as c:
        c.wait(lambda: c.conn.remote_settings.max_concurrent_streams == 100)
        sent = 0
        try:
            for _ in range(50):  # 50 rounds of 100 streams opened and cancelled at once
                for _ in range(100):
                    sid = c.request("POST", "/v1/chat/completions", CHAT, slow, flush=False)
                    c.conn.reset_stream(sid, ErrorCodes.CANCEL)
                    sent += 1
                c.flush()
                time.sleep(0.002)
        except (BrokenPipeError, ConnectionResetError):
            pass
        goaway = read_goaway(c.sock)
        assert goaway is not None and goaway[0] == ErrorCodes.ENHANCE_YOUR_CALM
    sidecar.wait_log("rapid reset")
    # What reached the backend was cancelled: nothing holds it once the connection is gone.
    stats = mock.wait_stats(lambda s: s["in_flight"] == 0, timeout=5)
    assert stats["completed"] == 0
    assert stats["requests"] < sent
    print(f"rapid reset: {sent} streams sent, {stats['requests']} reached the backend")
    still_serves(sidecar)


def test_cancelling_a_few_streams_is_fine(sidecar: SidecarProcess, mock: MockProcess) -> None:
    """A client that cancels now and then (a user pressing stop) stays connected."""
    with RawH2(sidecar.host, sidecar.port) as c:
        for _ in range(50):
            sid = c.request("POST", "/v1/chat/completions", CHAT, {"x-mock-first-byte-ms": "50"})
            c.conn.reset_stream(sid, ErrorCodes.CANCEL)
            c.flush()
        assert c.json(c.request("POST", "/v1/chat/completions", CHAT))[0] == 200
        assert c.goaway is None


# ---- slow readers: backpressure to the upstream, bounded memory ------------------------------

BIG_STREAM = {"x-mock-chunks": "2000", "x-mock-content-bytes": "10000"}  # 20 MB of SSE


@pytest.mark.parametrize("how", ["window", "socket"])
def test_slow_reader_pauses_the_upstream_and_memory_stays_flat(
    sidecar: SidecarProcess, mock: MockProcess, memory: None, how: str
) -> None:
    """``window``: the client never hands its 64 KiB flow-control window back. ``socket``: it opens
    huge windows but stops reading the socket. Either way the sidecar holds at most its per-stream
    buffer, stops reading the upstream (which stalls mid-stream), and serves others meanwhile; once
    the client reads again, the whole stream arrives."""
    huge = {SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1} if how == "socket" else None
    with RawH2(sidecar.host, sidecar.port, settings=huge) as c:
        if how == "socket":
            c.conn.increment_flow_control_window(2**31 - 1 - 65535)
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sid = c.request("POST", "/v1/chat/completions", {**CHAT, "stream": True}, BIG_STREAM)
        mock.wait_stats(lambda s: s["in_flight"] == 1)
        time.sleep(1.0)  # not reading: the 20 MB have nowhere to go
        still_serves(sidecar)
        assert mock.stats()["in_flight"] == 1  # the backend is stalled mid-stream, not done
        c.wait(lambda: sid in c.ended, timeout=30)  # read (and hand the window back) again
        body = bytes(c.bodies[sid])
        for _ in range(3):  # the upstream connection went back to the pool reading, not paused
            assert c.json(c.request("POST", "/v1/chat/completions", CHAT, {"x-mock-chunks": "1"}))[0] == 200
    assert body.count(b"data: ") == 2002 and body.endswith(b"data: [DONE]\n\n")
    assert len(body) > 20_000_000
    assert mock.stats()["completed"] == 5  # the stream, still_serves() and the three after


def test_a_stream_the_client_never_reads_is_reset_after_send_timeout(
    mock: MockProcess, tmp_path: Path
) -> None:
    config = minimal_config(mock.url, extra="http2: {send_timeout_s: 0.3}\n")
    with SidecarProcess(config, tmp_path) as sidecar, RawH2(sidecar.host, sidecar.port) as c:
        sid = c.request("POST", "/v1/chat/completions", {**CHAT, "stream": True}, BIG_STREAM)
        stats = mock.wait_stats(lambda s: s["disconnects"] == 1, timeout=5)  # the upstream request too
        assert stats["completed"] == 0
        c.wait(lambda: sid in c.resets)
        assert c.resets[sid] == ErrorCodes.CANCEL
        assert c.json(c.request("POST", "/v1/chat/completions", CHAT))[0] == 200  # the connection lives on
    sidecar.wait_log("took no data on stream 1")
