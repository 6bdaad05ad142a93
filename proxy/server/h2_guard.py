"""Flood protection for the HTTP/2 front: a frame-header scanner over the bytes a client sends.

The h2 library parses every frame fully and buffers a header block's CONTINUATION frames until the
block ends, so abuse must be seen before it gets there. :class:`FrameGuard` looks only at the
9-byte frame headers (payloads are skipped by length, never copied), counts what matters per
window and says when a client crossed a limit:

- a header block (HEADERS + CONTINUATION frames, 9 bytes counted per frame) over
  ``max_header_block_bytes`` — the CONTINUATION flood;
- control frames (PING, SETTINGS, PRIORITY, WINDOW_UPDATE, unknown types, and empty DATA frames
  without END_STREAM) over ``control_frame_limit`` plus twice the streams opened and the DATA
  frames the sidecar sent in the window (a client may answer each with window updates);
- in-flight streams reset by the client over ``rapid_reset_limit`` in a window — Rapid Reset,
  CVE-2023-44487 (counted by the connection, which knows whether a stream was still in flight).

Each is answered with GOAWAY ENHANCE_YOUR_CALM. It also answers the one framing error h2 gets
the code wrong for (a SETTINGS ACK with a payload: FRAME_SIZE_ERROR). Pure: the clock is injected,
no I/O.
"""

from __future__ import annotations

from typing import NamedTuple

from proxy.clock import Clock
from proxy.config import Http2Config

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_SIZE_ERROR = 0x6
ENHANCE_YOUR_CALM = 0xB

# Frame types (RFC 9113 §6) and flags.
DATA, HEADERS, CONTINUATION, PUSH_PROMISE, SETTINGS = 0x0, 0x1, 0x9, 0x5, 0x4
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
# Every other type (PRIORITY, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, extensions) is
# counted as a control frame; so is an empty DATA frame without END_STREAM.
_NOT_CONTROL = frozenset({DATA, HEADERS, PUSH_PROMISE, CONTINUATION})


class Violation(NamedTuple):
    """A limit the client crossed: the GOAWAY error code to send and a reason for the log."""

    error_code: int
    reason: str


class FrameGuard:
    """Counts a client's frames per window from their headers alone."""

    __slots__ = (
        "_block",
        "_clock",
        "_control",
        "_control_start",
        "_data_sent",
        "_head",
        "_max_block",
        "_preface",
        "_reset_start",
        "_resets",
        "_skip",
        "_streams",
        "cfg",
    )

    def __init__(self, cfg: Http2Config, clock: Clock, preface: bool = True) -> None:
        self.cfg = cfg
        self._clock = clock
        self._max_block = cfg.max_header_block_bytes
        self._preface = len(PREFACE) if preface else 0  # preface bytes still to skip
        self._skip = 0  # payload bytes of the current frame still to come
        self._head = b""  # a frame header split across reads
        self._block = -1  # bytes of the open header block; -1 when none is open
        now = clock.now()
        self._control_start = now
        self._control = 0
        self._streams = 0
        self._data_sent = 0
        self._reset_start = now
        self._resets = 0

    @property
    def in_header_block(self) -> bool:
        return self._block >= 0

    def note_data_sent(self) -> None:
        """The sidecar sent a DATA frame: the client may answer it with window updates."""
        self._data_sent += 1

    def note_reset(self) -> Violation | None:
        """The client reset a stream that was still in flight."""
        now = self._clock.now()
        if now - self._reset_start >= self.cfg.rapid_reset_window_s:
            self._reset_start = now
            self._resets = 0
        self._resets += 1
        if self._resets > self.cfg.rapid_reset_limit:
            return Violation(
                ENHANCE_YOUR_CALM,
                f"rapid reset: more than {self.cfg.rapid_reset_limit} streams cancelled "
                f"in {self.cfg.rapid_reset_window_s:g} s (http2.rapid_reset_limit)",
            )
        return None

    def feed(self, data: bytes) -> Violation | None:
        """Look at the frame headers in ``data`` (the next bytes from the client)."""
        pos = 0
        end = len(data)
        if self._preface:
            taken = min(self._preface, end)
            self._preface -= taken
            pos = taken
        skip = self._skip
        if skip:
            if skip >= end - pos:
                self._skip = skip - (end - pos)
                return None
            pos += skip
            self._skip = 0
        if self._head:
            need = 9 - len(self._head)
            head = self._head + data[pos : pos + need]
            if len(head) < 9:
                self._head = head
                return None
            self._head = b""
            pos += need
            found = self._frame(head[0] << 16 | head[1] << 8 | head[2], head[3], head[4])
            if found is not None:
                return found
            pos = self._advance(head[0] << 16 | head[1] << 8 | head[2], pos, end)
        frame = self._frame
        while pos < end:
            if end - pos < 9:
                self._head = data[pos:]
                break
            length = data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2]
            found = frame(length, data[pos + 3], data[pos + 4])
            if found is not None:
                return found
            pos += 9 + length
            if pos > end:
                self._skip = pos - end
                break
        return None

    def _advance(self, length: int, pos: int, end: int) -> int:
        """Skip the payload of the frame whose header just completed across reads."""
        if pos + length > end:
            self._skip = pos + length - end
            return end
        return pos + length

    def _frame(self, length: int, kind: int, flags: int) -> Violation | None:
        block = self._block
        if block >= 0:
            if kind != CONTINUATION:
                return None  # h2 answers a frame inside a header block with PROTOCOL_ERROR
            block += 9 + length
            if block > self._max_block:
                return Violation(
                    ENHANCE_YOUR_CALM,
                    f"header block over {self._max_block} bytes (http2.max_header_block_bytes)",
                )
            self._block = -1 if flags & END_HEADERS else block
            return None
        if kind == HEADERS:
            self._streams += 1
            if not flags & END_HEADERS:
                self._block = 9 + length
            return None
        if kind in _NOT_CONTROL and not (kind == DATA and length == 0 and not flags & END_STREAM):
            return None
        if kind == SETTINGS and flags & ACK and length:
            # RFC 9113 §6.5: FRAME_SIZE_ERROR (h2 would say PROTOCOL_ERROR).
            return Violation(FRAME_SIZE_ERROR, "a SETTINGS acknowledgement with a payload")
        return self._control_frame()

    def _control_frame(self) -> Violation | None:
        self._control += 1
        cfg = self.cfg
        if self._control <= cfg.control_frame_limit:
            return None
        now = self._clock.now()
        if now - self._control_start >= cfg.control_frame_window_s:
            self._control_start = now
            self._control = 1
            self._streams = 0
            self._data_sent = 0
            return None
        if self._control <= cfg.control_frame_limit + 2 * (self._streams + self._data_sent):
            return None
        return Violation(
            ENHANCE_YOUR_CALM,
            f"control frame flood: more than {cfg.control_frame_limit} PING/SETTINGS/PRIORITY/"
            f"WINDOW_UPDATE/empty DATA frames in {cfg.control_frame_window_s:g} s "
            "(http2.control_frame_limit)",
        )
