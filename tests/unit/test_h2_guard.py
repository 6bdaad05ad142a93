"""FrameGuard: the frame-header scanner that catches HTTP/2 floods, driven with a fake clock."""

from __future__ import annotations

import struct

import pytest

from proxy.clock import FakeClock
from proxy.config import Http2Config
from proxy.server.h2_guard import ENHANCE_YOUR_CALM, PREFACE, FrameGuard

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, WINDOW_UPDATE, CONTINUATION = 0, 1, 2, 3, 4, 6, 8, 9
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind: int, flags: int = 0, sid: int = 0, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload


def ping() -> bytes:
    return frame(PING, payload=b"\0" * 8)


def guard(**cfg: float) -> tuple[FrameGuard, FakeClock]:
    clock = FakeClock()
    return FrameGuard(Http2Config(**cfg), clock), clock  # type: ignore[arg-type]


def test_normal_traffic_passes() -> None:
    g, _ = guard()
    data = PREFACE + frame(SETTINGS, payload=b"\0\3\0\0\0\x64") + frame(SETTINGS, ACK)
    data += frame(HEADERS, END_HEADERS, 1, b"x" * 40) + frame(DATA, END_STREAM, 1, b"{}" * 100)
    assert g.feed(data) is None
    assert not g.in_header_block


def test_frames_split_anywhere_are_seen_the_same() -> None:
    """A flood cut into 1..17-byte reads (headers and payloads split) is still counted exactly."""
    stream = PREFACE + b"".join(ping() for _ in range(11))
    for step in range(1, 18):
        g, _ = guard(control_frame_limit=10)
        results = [g.feed(stream[i : i + step]) for i in range(0, len(stream), step)]
        found = [r for r in results if r is not None]
        assert len(found) == 1, step
        assert found[0].error_code == ENHANCE_YOUR_CALM
        assert "control frame flood" in found[0].reason


def test_ping_flood_over_the_limit_in_the_window() -> None:
    g, clock = guard(control_frame_limit=100, control_frame_window_s=10)
    assert g.feed(PREFACE + ping() * 100) is None
    clock.advance(5)
    violation = g.feed(ping())
    assert violation is not None and violation.error_code == ENHANCE_YOUR_CALM


def test_control_frames_spread_over_windows_pass() -> None:
    g, clock = guard(control_frame_limit=100, control_frame_window_s=10)
    g.feed(PREFACE)
    for _ in range(20):
        assert g.feed(ping() * 90) is None
        clock.advance(10)


@pytest.mark.parametrize(
    "flood",
    [
        frame(SETTINGS),
        frame(SETTINGS, ACK),
        frame(PRIORITY, sid=1, payload=b"\0" * 5),
        frame(WINDOW_UPDATE, sid=0, payload=b"\0\0\0\1"),
        frame(RST_STREAM, sid=1, payload=b"\0\0\0\0"),
        frame(DATA, sid=1),  # empty DATA without END_STREAM
        frame(0x42, sid=0, payload=b"ext"),  # an unknown extension type
    ],
)
def test_each_kind_of_control_frame_counts(flood: bytes) -> None:
    g, _ = guard(control_frame_limit=50)
    assert g.feed(PREFACE + flood * 50) is None
    assert g.feed(flood) is not None


def test_data_with_payload_or_end_stream_is_not_control() -> None:
    g, _ = guard(control_frame_limit=10)
    assert g.feed(PREFACE + frame(DATA, 0, 1, b"x") * 100 + frame(DATA, END_STREAM, 3) * 100) is None


def test_streams_and_data_sent_earn_window_updates() -> None:
    """A client may answer each DATA frame the sidecar sends with window updates."""
    g, _ = guard(control_frame_limit=10)
    g.feed(PREFACE)
    for _ in range(500):
        g.note_data_sent()
    update = frame(WINDOW_UPDATE, sid=1, payload=b"\0\0\1\0")
    assert g.feed(update * 1000) is None
    assert g.feed(update * 100) is not None


def test_continuation_flood_is_caught_before_the_block_ends() -> None:
    g, _ = guard(max_header_block_bytes=4096)
    assert g.feed(PREFACE + frame(HEADERS, 0, 1, b"h" * 100)) is None
    assert g.in_header_block
    violation = None
    for _ in range(100):
        violation = g.feed(frame(CONTINUATION, 0, 1, b"c" * 100))
        if violation is not None:
            break
    assert violation is not None and violation.error_code == ENHANCE_YOUR_CALM
    assert "max_header_block_bytes" in violation.reason


def test_empty_continuation_frames_count_their_headers() -> None:
    g, _ = guard(max_header_block_bytes=1024)
    g.feed(PREFACE + frame(HEADERS, 0, 1, b"h"))
    assert g.feed(frame(CONTINUATION, 0, 1) * 200) is not None


def test_a_header_block_that_ends_closes() -> None:
    g, _ = guard(max_header_block_bytes=4096)
    block = frame(HEADERS, 0, 1, b"h" * 1000) + frame(CONTINUATION, 0, 1, b"c" * 1000)
    block += frame(CONTINUATION, END_HEADERS, 1, b"c" * 1000)
    for sid in range(10):
        assert g.feed(block) is None, sid
        assert not g.in_header_block


def test_rapid_reset_over_the_limit_in_the_window() -> None:
    g, clock = guard(rapid_reset_limit=3, rapid_reset_window_s=10)
    assert [g.note_reset() for _ in range(3)] == [None, None, None]
    clock.advance(9)
    violation = g.note_reset()
    assert violation is not None and violation.error_code == ENHANCE_YOUR_CALM
    assert "rapid reset" in violation.reason


def test_resets_spread_over_windows_pass() -> None:
    g, clock = guard(rapid_reset_limit=3, rapid_reset_window_s=10)
    for _ in range(10):
        assert [g.note_reset() for _ in range(3)] == [None, None, None]
        clock.advance(10)


def test_a_settings_ack_with_a_payload_is_a_frame_size_error() -> None:
    g, _ = guard()
    violation = g.feed(PREFACE + frame(SETTINGS, ACK, payload=b"\0\4\0\0\xff\xff"))
    assert violation is not None and violation.error_code == 0x6
    assert guard()[0].feed(PREFACE + frame(SETTINGS, ACK)) is None
