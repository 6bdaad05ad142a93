"""Usage out of SSE streams (proxy/sse.py), the body tap (proxy/body.py) and the settlers around
them (middleware/rate_limit/settle.py): split events, the stripped usage chunk, aborted streams."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest

from middleware.rate_limit.settle import JsonSettler, StreamSettler, settle_response
from proxy.body import TappedBody, TappedIterator, tap_body
from proxy.http import BodySink, Headers, Response
from proxy.sse import MAX_LINE_BYTES, SseUsageWatcher
from proxy.usage import Usage, usage_of_json


def event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def delta(text: str) -> bytes:
    choice = {"index": 0, "delta": {"content": text}}
    return event({"id": "c1", "object": "chat.completion.chunk", "choices": [choice]})


USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
ROLE = event({"id": "c1", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
STOP = event({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
USAGE_CHUNK = event({"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE})
DONE = b"data: [DONE]\n\n"
CONTENT = ROLE + delta("Hel") + delta("lo") + delta("!") + STOP
STREAM = CONTENT + USAGE_CHUNK + DONE


def run(watcher: SseUsageWatcher, chunks: list[bytes]) -> bytes:
    return b"".join(watcher.feed(c) for c in chunks) + watcher.flush()


def splits(data: bytes) -> list[list[bytes]]:
    """``data`` cut in two at every position, and byte by byte."""
    cuts = [[data[:i], data[i:]] for i in range(1, len(data))]
    return [*cuts, [data[i : i + 1] for i in range(len(data))]]


# -- the watcher ------------------------------------------------------------------------------------


def test_usage_and_deltas_are_read_and_bytes_pass_unchanged() -> None:
    watcher = SseUsageWatcher()
    out = [watcher.feed(c) for c in (CONTENT, USAGE_CHUNK, DONE)]
    assert out == [CONTENT, USAGE_CHUNK, DONE]  # the very same chunks, at once
    assert watcher.usage == Usage(7, 3, 10)
    assert watcher.deltas == 3  # the empty role delta is no token


def test_events_split_anywhere_are_read_and_never_held_when_not_stripping() -> None:
    for chunks in splits(STREAM):
        watcher = SseUsageWatcher()
        assert [watcher.feed(c) for c in chunks] == chunks, chunks
        assert (watcher.usage, watcher.deltas) == (Usage(7, 3, 10), 3), chunks


def test_the_injected_usage_chunk_is_stripped_wherever_the_stream_is_cut() -> None:
    for chunks in splits(STREAM):
        watcher = SseUsageWatcher(strip_usage_chunk=True)
        assert run(watcher, chunks) == CONTENT + DONE, chunks
        assert watcher.usage == Usage(7, 3, 10), chunks


def test_stripping_holds_back_only_an_unfinished_line() -> None:
    watcher = SseUsageWatcher(strip_usage_chunk=True)
    first = delta("a")
    assert watcher.feed(first + b"data: {") == first  # the complete event passes at once
    assert watcher.feed(b'"x":1}\n\n') == b'data: {"x":1}\n\n'


def test_crlf_streams_are_read_and_stripped() -> None:
    crlf = STREAM.replace(b"\n", b"\r\n")
    watcher = SseUsageWatcher(strip_usage_chunk=True)
    assert run(watcher, [crlf]) == (CONTENT + DONE).replace(b"\n", b"\r\n")
    assert watcher.usage == Usage(7, 3, 10)


def test_a_usage_chunk_with_choices_is_not_stripped() -> None:
    last = event({"id": "c1", "choices": [{"index": 0, "delta": {"content": "x"}}], "usage": USAGE})
    watcher = SseUsageWatcher(strip_usage_chunk=True)
    assert run(watcher, [CONTENT, last, DONE]) == CONTENT + last + DONE
    assert watcher.usage == Usage(7, 3, 10)


def test_null_usage_on_every_chunk_is_ignored_cheaply() -> None:
    chunk = event({"id": "c1", "choices": [{"index": 0, "delta": {"content": "x"}}], "usage": None})
    watcher = SseUsageWatcher()
    run(watcher, [chunk] * 5)
    assert (watcher.usage, watcher.deltas) == (None, 5)


def test_a_huge_line_passes_without_being_kept() -> None:
    huge = b"data: " + b"x" * (MAX_LINE_BYTES + 10)
    watcher = SseUsageWatcher(strip_usage_chunk=True)
    out = watcher.feed(huge[:100]) + watcher.feed(huge[100:])
    assert out == huge  # too long to hold back: passed on
    assert watcher.feed(b"\n\n" + USAGE_CHUNK) == b"\n\n"
    assert watcher.usage == Usage(7, 3, 10)


# -- the body tap -----------------------------------------------------------------------------------


class FakeUpstream:
    """A PipeableBody pushing chunks by callbacks, like proxy.upstream.h1.UpstreamBody."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.sink: BodySink | None = None
        self.paused = 0
        self.aborted = False

    def pipe(self, sink: BodySink) -> None:
        self.sink = sink

    def push_all(self) -> None:
        assert self.sink is not None
        for c in self.chunks:
            self.sink.write(c)

    def pause_producing(self) -> None:
        self.paused += 1

    def resume_producing(self) -> None:
        self.paused -= 1

    def abort(self) -> None:
        self.aborted = True

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)


class Sink:
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.finished = False
        self.failed: BaseException | None = None

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def finish(self) -> None:
        self.finished = True

    def fail(self, exc: BaseException) -> None:
        self.failed = exc


class Charges:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, tokens: int) -> None:
        self.calls.append(tokens)


def test_a_piped_body_stays_on_callbacks_and_is_settled_once_at_its_end() -> None:
    upstream, sink, charges = (
        FakeUpstream([CONTENT, USAGE_CHUNK[:20], USAGE_CHUNK[20:] + DONE]),
        Sink(),
        Charges(),
    )
    body = tap_body(upstream, StreamSettler(SseUsageWatcher(strip_usage_chunk=True), 50, charges))
    assert isinstance(body, TappedBody) and body.length is None  # stripping: length unknown
    body.pipe(sink)
    upstream.push_all()
    body.pause_producing()
    assert upstream.paused == 1
    body.resume_producing()
    assert b"".join(sink.data) == CONTENT + DONE and not sink.finished
    assert charges.calls == []
    body.finish()
    body.finish()  # a second end is ignored
    assert sink.finished and charges.calls == [10]


def test_a_stream_the_client_left_is_charged_what_was_generated() -> None:
    upstream, sink, charges = FakeUpstream([ROLE, delta("a"), delta("b")]), Sink(), Charges()
    body = tap_body(upstream, StreamSettler(SseUsageWatcher(strip_usage_chunk=True), 50, charges))
    assert isinstance(body, TappedBody)
    body.pipe(sink)
    upstream.push_all()
    body.abort()  # the front: the client went away
    assert upstream.aborted
    assert charges.calls == [50 + 2]  # prompt estimate + two content deltas
    body.fail(ConnectionResetError())  # a late callback does not charge twice
    assert charges.calls == [52]


def test_a_stream_the_upstream_cut_is_charged_and_the_sink_told() -> None:
    upstream, sink, charges = FakeUpstream([delta("a")]), Sink(), Charges()
    body = tap_body(upstream, StreamSettler(SseUsageWatcher(), 9, charges))
    assert isinstance(body, TappedBody)
    body.pipe(sink)
    upstream.push_all()
    error = ConnectionResetError("upstream closed")
    body.fail(error)
    assert sink.failed is error and charges.calls == [10]


async def test_an_iterated_body_is_tapped_the_same_way() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for c in (CONTENT[:30], CONTENT[30:], USAGE_CHUNK, DONE):
            yield c

    charges = Charges()
    body = tap_body(chunks(), StreamSettler(SseUsageWatcher(strip_usage_chunk=True), 50, charges))
    assert type(body) is TappedIterator
    assert b"".join([c async for c in body]) == CONTENT + DONE
    assert charges.calls == [10]


async def test_an_iterated_body_cancelled_midway_is_charged_what_was_generated() -> None:
    gate = asyncio.Event()

    async def chunks() -> AsyncIterator[bytes]:
        yield ROLE + delta("a")
        await gate.wait()
        yield delta("never")

    charges = Charges()
    body = tap_body(chunks(), StreamSettler(SseUsageWatcher(), 20, charges))
    assert await body.__anext__() == ROLE + delta("a")
    task = asyncio.ensure_future(body.__anext__())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert charges.calls == [21]
    await body.aclose()
    assert charges.calls == [21]


async def test_an_iterated_body_dropped_unread_is_settled() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield delta("never read")

    charges = Charges()
    body = tap_body(chunks(), StreamSettler(SseUsageWatcher(), 20, charges))
    body.abort()  # what a front does with a body it will not send
    assert charges.calls == [20]


# -- settling a response ----------------------------------------------------------------------------


def response(body: bytes | AsyncIterator[bytes], content_type: bytes, status: int = 200) -> Response:
    return Response(status, Headers([(b"content-type", content_type)]), body)


def test_a_json_answer_is_settled_with_its_usage_at_once() -> None:
    charges = Charges()
    body = orjson.dumps({"choices": [], "usage": USAGE})
    settle_response(response(body, b"application/json"), 100, 40, False, 1 << 20, charges)
    assert charges.calls == [10]


def test_a_whole_sse_answer_is_stripped_and_settled() -> None:
    charges = Charges()
    r = response(STREAM, b"text/event-stream")
    settle_response(r, 100, 40, True, 1 << 20, charges)
    assert r.body == CONTENT + DONE and charges.calls == [10]


def test_an_error_status_gives_everything_back() -> None:
    charges = Charges()
    settle_response(response(b'{"error": {}}', b"application/json", 500), 100, 40, False, 1 << 20, charges)
    assert charges.calls == [0]


def test_a_streamed_json_answer_keeps_a_bounded_copy() -> None:
    body = orjson.dumps({"choices": [{"message": {"content": "x" * 100}}], "usage": USAGE})
    small = JsonSettler(len(body), 100, Charges())
    for i in range(0, len(body), 7):
        assert small.feed(body[i : i + 7]) == body[i : i + 7]
    small.end(None)
    too_big = JsonSettler(len(body) - 1, 100, Charges())
    too_big.feed(body)
    too_big.end(None)
    cut = JsonSettler(len(body), 100, Charges())
    cut.feed(body)
    cut.end(ConnectionResetError())
    assert [small.settle.calls, too_big.settle.calls, cut.settle.calls] == [[10], [100], [100]]  # type: ignore[attr-defined]


def test_usage_of_json_ignores_what_is_not_usage() -> None:
    assert usage_of_json(b'{"usage": null}') is None
    assert usage_of_json(b'not json with "usage"') is None
    assert usage_of_json(b'{"usage": {"input_tokens": 3, "output_tokens": 4}}') == Usage(3, 4, 7)
