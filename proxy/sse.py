"""Reading token usage out of an OpenAI-style SSE stream as it passes, chunk by chunk.

Events (``data: {...}\\n\\n``) may be split anywhere across chunks. :class:`SseUsageWatcher` keeps
only the bytes of an unfinished line, to read it once it is complete; the chunks themselves pass on
unchanged and at once. It records the last ``usage`` seen and counts content deltas (what an
aborted stream has generated, roughly one token each, when no usage came).

With ``strip_usage_chunk`` (the sidecar asked the backend for ``stream_options.include_usage`` on
the client's behalf) the usage-only chunk — ``choices: []`` plus ``usage`` — is removed from what
the client sees. Only then are the bytes of an unfinished line held back until the line is
complete, since it might be that chunk; complete lines still pass on at once.
"""

from __future__ import annotations

import re
from typing import Final

import orjson

from proxy.usage import Usage, usage_of

# An unfinished line longer than this is passed on and not parsed: memory stays bounded.
MAX_LINE_BYTES: Final = 1024 * 1024

_DELTA: Final = re.compile(rb'"(?:content|text|arguments)"\s*:\s*"[^"]')
_NULL_USAGE: Final = (b'"usage":null', b'"usage": null')


class SseUsageWatcher:
    """Watches an SSE byte stream for ``usage`` and content deltas; see the module docstring."""

    __slots__ = ("_long_line", "_partial", "_skip_blank", "deltas", "keeps_length", "strip", "usage")

    def __init__(self, strip_usage_chunk: bool = False) -> None:
        self.strip = strip_usage_chunk
        self.keeps_length = not strip_usage_chunk
        self.usage: Usage | None = None  # the last usage the stream reported
        self.deltas = 0  # events that carried generated text (or tool-call arguments)
        self._partial = b""  # an unfinished line
        self._long_line = False  # the current line outgrew MAX_LINE_BYTES: pass it, do not parse it
        self._skip_blank = False  # a stripped event's blank separator line is still to come

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to pass on now for ``chunk``."""
        data = self._partial + chunk if self._partial else chunk
        end = data.rfind(b"\n")
        if end < 0:
            return self._hold(data, chunk)
        self._partial = b""
        complete = data[: end + 1]
        kept = self._scan(complete)
        rest = data[end + 1 :]
        out = self._hold(rest, b"") if rest else b""
        if not self.strip:
            return chunk
        return kept + out if out else kept

    def flush(self) -> bytes:
        """At the end of the stream: the bytes still held back (an unfinished last line)."""
        held, self._partial = self._partial, b""
        return held if self.strip else b""

    def _hold(self, data: bytes, chunk: bytes) -> bytes:
        """Keep ``data`` (an unfinished line) for later; returns what must pass on now instead."""
        if len(data) <= MAX_LINE_BYTES:
            self._partial = data
            return b"" if self.strip else chunk
        self._partial = b""
        self._long_line = True
        return data if self.strip else chunk

    def _scan(self, complete: bytes) -> bytes:
        """Read the complete lines in ``complete``; returns them minus any stripped usage event."""
        lines = complete.split(b"\n")
        lines.pop()  # the empty string after the last newline
        kept: list[bytes] | None = None  # built only once a line is dropped
        for i, line in enumerate(lines):
            skip_blank, self._skip_blank = self._skip_blank, False
            drop = False
            if self._long_line:
                self._long_line = False
            elif skip_blank and line in (b"", b"\r"):
                drop = True
            elif line.startswith(b"data:"):
                drop = self._read_event(line) and self.strip
                self._skip_blank = drop
            if drop:
                if kept is None:
                    kept = lines[:i]
            elif kept is not None:
                kept.append(line)
        if kept is None:
            return complete
        return b"".join(line + b"\n" for line in kept)

    def _read_event(self, line: bytes) -> bool:
        """Record what a ``data:`` line says; True when it is a usage-only chunk."""
        if b'"usage"' in line and not any(null in line for null in _NULL_USAGE):
            try:
                event = orjson.loads(line[5:])
            except orjson.JSONDecodeError:
                return False
            usage = usage_of(event)
            if usage is not None:
                self.usage = usage
                if event.get("choices") == []:
                    return True
        if _DELTA.search(line) is not None:
            self.deltas += 1
        return False
