"""Settling a request's tokens when its response ends: usage read from the body as it passes.

- A complete body (``bytes``): JSON → its ``usage``; an SSE stream that arrived whole → the same
  watcher as below, run once (stripping the usage chunk the sidecar asked for).
- A streamed SSE body: :class:`StreamSettler`, a body tap (proxy/body.py) around
  proxy.sse.SseUsageWatcher. A stream that ends without usage, or is cut (client gone, upstream
  failed), is charged the prompt estimate plus one token per content delta seen.
- A streamed JSON body (a large answer arriving in pieces): :class:`JsonSettler` keeps a bounded
  copy to read ``usage`` at the end; bigger, cut or other bodies are charged the reservation.
- An error status: nothing was generated; the reserved tokens all go back.
"""

from __future__ import annotations

from collections.abc import Callable

from proxy.body import tap_body
from proxy.http import Response
from proxy.sse import SseUsageWatcher
from proxy.usage import usage_of_json

Settle = Callable[[int], None]  # called once with the tokens the request really used


def json_total_tokens(body: bytes) -> int | None:
    """The ``usage.total_tokens`` of a complete JSON answer, or None (no usage, or not JSON).

    The whole answer is parsed: reading ``"usage": {…}`` straight from the bytes was cheaper, but
    it also matched a ``usage`` object nested in what an answer repeats of the client's request
    (a Responses API answer echoes its ``tools``), which let a client choose its own charge."""
    usage = usage_of_json(body)
    return None if usage is None else usage.total_tokens


class StreamSettler:
    __slots__ = ("keeps_length", "prompt_estimate", "settle", "watcher")

    def __init__(self, watcher: SseUsageWatcher, prompt_estimate: int, settle: Settle) -> None:
        self.watcher = watcher
        self.keeps_length = watcher.keeps_length
        self.prompt_estimate = prompt_estimate
        self.settle = settle

    def feed(self, chunk: bytes) -> bytes:
        return self.watcher.feed(chunk)

    def end(self, exc: BaseException | None) -> bytes:
        rest = self.watcher.flush()
        usage = self.watcher.usage
        self.settle(usage.total_tokens if usage is not None else self.prompt_estimate + self.watcher.deltas)
        return rest if exc is None else b""


class JsonSettler:
    __slots__ = ("_parts", "_room", "fallback", "keeps_length", "settle")

    def __init__(self, max_bytes: int, fallback: int, settle: Settle) -> None:
        self.keeps_length = True
        self._parts: list[bytes] | None = []
        self._room = max_bytes
        self.fallback = fallback
        self.settle = settle

    def feed(self, chunk: bytes) -> bytes:
        parts = self._parts
        if parts is not None:
            self._room -= len(chunk)
            if self._room < 0:
                self._parts = None  # too big to keep: charge the reservation
            else:
                parts.append(chunk)
        return chunk

    def end(self, exc: BaseException | None) -> bytes:
        usage = None
        if exc is None and self._parts is not None:
            usage = json_total_tokens(b"".join(self._parts))
        self._parts = None
        self.settle(usage if usage is not None else self.fallback)
        return b""


def settle_response(
    response: Response,
    reserved: int,
    prompt_estimate: int,
    strip_usage: bool,
    max_usage_body_bytes: int,
    settle: Settle,
) -> None:
    """Arrange for ``settle`` to be called once with the tokens ``response`` used; may wrap its body."""
    if not 200 <= response.status < 300:
        settle(0)
        return
    content_type = response.headers.get(b"content-type") or b""
    is_sse = content_type.startswith(b"text/event-stream")
    body = response.body
    if isinstance(body, bytes):
        if is_sse:
            watcher = SseUsageWatcher(strip_usage)
            kept = watcher.feed(body) + watcher.flush()
            if strip_usage:
                response.body = kept
            usage = watcher.usage
            settle(usage.total_tokens if usage is not None else prompt_estimate + watcher.deltas)
        else:
            total = json_total_tokens(body)
            settle(total if total is not None else reserved)
        return
    if is_sse:
        response.body = tap_body(body, StreamSettler(SseUsageWatcher(strip_usage), prompt_estimate, settle))
    else:  # settled at its end, so an in-flight slot is held as long as the response lasts
        keep = max_usage_body_bytes if b"json" in content_type else 0
        response.body = tap_body(body, JsonSettler(keep, reserved, settle))
