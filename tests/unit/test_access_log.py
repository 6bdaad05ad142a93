"""proxy/access_log.py: one entry per request when its response is complete, with a fake clock."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import cast

import orjson
import pytest

from proxy.access_format import MAX_BODY_LOGGED, AccessEntry, access_fields, access_text
from proxy.access_log import AccessLog
from proxy.chain import Handler
from proxy.clock import FakeClock
from proxy.config import LogConfig
from proxy.errors import ModelNotFound, RateLimited, UpstreamClosed
from proxy.http import BodySink, Headers, PipeableBody, Request, RequestContext, Response
from proxy.routing import Target
from proxy.usage import Usage

PROMPT = "a distinctive prompt: zebra quokka 4711"
USAGE = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
ANSWER = orjson.dumps(
    {"choices": [{"message": {"role": "assistant", "content": "the answer text"}}], "usage": USAGE}
)
TARGET = Target("mock", "mock-model-v1", 100.0)
SSE = [(b"content-type", b"text/event-stream")]
JSON = [(b"content-type", b"application/json")]


def event(payload: object) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def delta(text: str) -> bytes:
    return event({"choices": [{"index": 0, "delta": {"content": text}}]})


USAGE_EVENT = event({"choices": [], "usage": USAGE})
DONE = b"data: [DONE]\n\n"


class Recorder:
    def __init__(self) -> None:
        self.entries: list[AccessEntry] = []

    def __call__(self, entry: AccessEntry) -> None:
        self.entries.append(entry)

    def one(self) -> dict[str, object]:
        [entry] = self.entries
        return access_fields(entry)


def make_request(clock: FakeClock, body: bytes | None = None) -> Request:
    if body is None:
        body = orjson.dumps({"model": "demo-model", "messages": [{"role": "user", "content": PROMPT}]})
    headers = Headers([(b"content-type", b"application/json")])
    return Request(
        "POST", b"/v1/chat/completions", headers, body, RequestContext(b"rid-7", "10.0.0.1:4000", clock.now())
    )


async def chunks(
    parts: list[bytes], clock: FakeClock, fail: BaseException | None = None
) -> AsyncIterator[bytes]:
    for part in parts:
        clock.advance(0.010)
        yield part
    if fail is not None:
        raise fail


def serve(response: Response, clock: FakeClock, took: float = 0.050, attempt: int = 0) -> Handler:
    async def handler(request: Request) -> Response:
        request.ctx.target = TARGET
        request.ctx.attempt = attempt
        request.ctx.tenant, request.ctx.identity = "acme", "key-1"
        clock.advance(took)
        return response

    return handler


async def test_a_whole_answer_is_logged_once_with_its_usage() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(access_log=True), sink, wall=lambda: 1.0)
    request = make_request(clock)
    response = await access(request, serve(Response(200, JSON, ANSWER), clock, attempt=1))
    assert response.body == ANSWER
    fields = sink.one()
    assert fields == {
        "time": None,  # the log thread's stamp
        "level": "info",
        "logger": "llm_sidecar.access",
        "request_id": "rid-7",
        "client": "10.0.0.1:4000",
        "method": "POST",
        "path": "/v1/chat/completions",
        "route": "demo-model",
        "tenant": "acme",
        "identity": "key-1",
        "upstream": "mock",
        "model": "mock-model-v1",
        "status": 200,
        "bytes_in": len(request.body),
        "bytes_out": len(ANSWER),
        "tokens_in": 11,
        "tokens_out": 3,
        "duration_ms": 50.0,
        "attempts": 2,
    }
    assert PROMPT not in str(fields) and "the answer text" not in str(fields)


async def test_a_stream_is_logged_at_its_end_with_ttft_and_usage() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)
    request = make_request(clock)
    # The usage event split across two chunks (the end of the stream comes with the second).
    parts = [delta("Hel"), delta("lo"), USAGE_EVENT[:20], USAGE_EVENT[20:] + DONE]
    response = await access(request, serve(Response(200, SSE, chunks(parts, clock)), clock, took=0.030))
    assert sink.entries == []  # the head is not the end
    body = response.body
    assert not isinstance(body, bytes)
    sent = [chunk async for chunk in body]
    assert sent == parts  # passed on unchanged
    fields = sink.one()
    assert fields["status"] == 200 and "outcome" not in fields
    assert fields["bytes_out"] == sum(map(len, parts))
    assert (fields["tokens_in"], fields["tokens_out"]) == (11, 3)
    assert fields["ttft_ms"] == 40.0  # the chain's 30 ms, then 10 ms to the first chunk
    assert fields["duration_ms"] == 70.0  # and 3 more chunks of 10 ms


async def test_a_stream_without_usage_has_no_token_counts() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)
    response = await access(
        make_request(clock), serve(Response(200, SSE, chunks([delta("x"), DONE], clock)), clock)
    )
    assert not isinstance(response.body, bytes)
    _ = [chunk async for chunk in response.body]
    fields = sink.one()
    assert "tokens_in" not in fields and "tokens_out" not in fields


async def test_a_client_that_leaves_mid_stream_is_logged() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)
    request = make_request(clock)
    response = await access(
        request, serve(Response(200, SSE, chunks([delta("a"), delta("b")], clock)), clock)
    )
    body = response.body
    assert not isinstance(body, bytes)
    first = await body.__anext__()
    request.ctx.disconnected = True
    await body.aclose()  # type: ignore[attr-defined]
    fields = sink.one()
    assert (fields["status"], fields["outcome"], fields["bytes_out"]) == (200, "client_closed", len(first))


async def test_an_upstream_that_breaks_a_stream_off_is_logged() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)
    broken = chunks([delta("a")], clock, fail=UpstreamClosed("the upstream closed the connection"))
    response = await access(make_request(clock), serve(Response(200, SSE, broken), clock))
    assert not isinstance(response.body, bytes)
    with pytest.raises(UpstreamClosed):
        _ = [chunk async for chunk in response.body]
    fields = sink.one()
    assert fields["outcome"] == "upstream_failed"
    assert fields["error_type"] == "upstream_connection_closed"


async def test_a_streamed_json_answer_has_its_usage_read_at_its_end() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)
    parts = [ANSWER[:30], ANSWER[30:]]
    response = await access(make_request(clock), serve(Response(200, JSON, chunks(parts, clock)), clock))
    assert not isinstance(response.body, bytes)
    _ = [chunk async for chunk in response.body]
    fields = sink.one()
    assert (fields["tokens_in"], fields["tokens_out"], fields["bytes_out"]) == (11, 3, len(ANSWER))


async def test_an_error_the_sidecar_answers_is_logged_then_raised() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)

    async def refuse(request: Request) -> Response:
        clock.advance(0.002)
        raise RateLimited("too many", kind="requests", headers=())

    with pytest.raises(RateLimited):
        await access(make_request(clock), refuse)
    fields = sink.one()
    assert (fields["status"], fields["error_type"], fields["upstream"]) == (429, "rate_limit_exceeded", None)
    assert fields["bytes_out"] == 0 and fields["duration_ms"] == 2.0
    assert access_text(fields).startswith('rid-7 10.0.0.1:4000 "POST /v1/chat/completions" 429 - 2.0ms ')


async def test_a_client_gone_before_the_answer_is_499_client_closed() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)

    async def cancelled(request: Request) -> Response:
        request.ctx.disconnected = True
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await access(make_request(clock), cancelled)
    fields = sink.one()
    assert (fields["status"], fields["outcome"]) == (499, "client_closed")


async def test_a_bad_body_still_gets_its_line() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)

    async def not_found(request: Request) -> Response:
        raise ModelNotFound("no such model")

    with pytest.raises(ModelNotFound):
        await access(make_request(clock, body=b"{not json"), not_found)
    fields = sink.one()
    assert (fields["route"], fields["status"], fields["error_type"]) == (None, 404, "model_not_found")


async def test_cache_and_a_middleware_usage_come_from_ctx_extra() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)

    async def cached(request: Request) -> Response:
        request.ctx.extra["cache"] = "hit"
        request.ctx.extra["usage"] = Usage(4, 5, 9)  # e.g. read by a middleware that stripped it
        return Response(200, JSON, b'{"choices": []}')

    await access(make_request(clock), cached)
    fields = sink.one()
    assert (fields["cache"], fields["tokens_in"], fields["tokens_out"]) == ("hit", 4, 5)


async def test_bodies_are_logged_only_when_asked_and_cut_at_64_kib() -> None:
    clock = FakeClock()
    big = "x" * (MAX_BODY_LOGGED + 100)
    body = orjson.dumps({"model": "demo-model", "messages": [{"role": "user", "content": PROMPT + big}]})

    without, with_bodies = Recorder(), Recorder()
    await AccessLog(clock, LogConfig(), without)(
        make_request(clock, body), serve(Response(200, JSON, ANSWER), clock)
    )
    fields = without.one()
    assert "request_body" not in fields and "response_body" not in fields

    access = AccessLog(clock, LogConfig(bodies=True), with_bodies)
    await access(make_request(clock, body), serve(Response(200, JSON, ANSWER), clock))
    fields = with_bodies.one()
    request_body, response_body = fields["request_body"], fields["response_body"]
    assert isinstance(request_body, str) and isinstance(response_body, str)
    assert PROMPT in request_body
    assert request_body.endswith(f"…[{len(body) - MAX_BODY_LOGGED} more bytes]")
    assert len(request_body) < MAX_BODY_LOGGED + 30
    assert response_body == ANSWER.decode()


async def test_bodies_of_a_stream_are_its_first_64_kib() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(bodies=True), sink)
    parts = [delta("Hel"), delta("lo"), USAGE_EVENT, DONE]
    response = await access(make_request(clock), serve(Response(200, SSE, chunks(parts, clock)), clock))
    assert not isinstance(response.body, bytes)
    _ = [chunk async for chunk in response.body]
    fields = sink.one()
    assert fields["response_body"] == b"".join(parts).decode()
    assert fields["tokens_out"] == 3


async def test_without_a_sink_it_is_a_record_of_the_access_logger(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    caplog.set_level(logging.INFO, logger="llm_sidecar.access")
    await AccessLog(clock)(make_request(clock), serve(Response(200, JSON, ANSWER), clock))
    [record] = caplog.records
    assert record.name == "llm_sidecar.access"
    assert record.getMessage().startswith(
        'rid-7 10.0.0.1:4000 "POST /v1/chat/completions" 200 mock/mock-model-v1 50.0ms route=demo-model'
    )


@pytest.mark.parametrize(
    "tail",
    [
        [USAGE_EVENT, DONE],  # the end in a chunk of its own
        [USAGE_EVENT + DONE],
        [USAGE_EVENT[:25], USAGE_EVENT[25:] + DONE],
        [event({"choices": [{"delta": {"content": "x"}}], "usage": None}) + USAGE_EVENT, DONE],
    ],
    ids=["done-alone", "together", "split", "null-usage-before"],
)
async def test_the_usage_event_is_found_at_the_end_of_a_stream(tail: list[bytes]) -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)
    parts = [delta(str(i)) for i in range(20)] + tail
    response = await access(make_request(clock), serve(Response(200, SSE, chunks(parts, clock)), clock))
    assert not isinstance(response.body, bytes)
    _ = [chunk async for chunk in response.body]
    fields = sink.one()
    assert (fields["tokens_in"], fields["tokens_out"]) == (11, 3)


async def test_a_whole_sse_answer_has_its_usage_read() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)
    body = delta("Hel") + delta("lo") + USAGE_EVENT + DONE
    await access(make_request(clock), serve(Response(200, SSE, body), clock))
    fields = sink.one()
    assert (fields["tokens_in"], fields["tokens_out"], fields["bytes_out"]) == (11, 3, len(body))
    assert "ttft_ms" not in fields


async def test_a_usage_the_client_sent_is_not_taken_for_the_answers() -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)
    # A whole JSON answer is parsed in full: only its top-level usage counts.
    echo = orjson.dumps({"echo": {"usage": {"prompt_tokens": 999, "completion_tokens": 999}}})
    await access(make_request(clock), serve(Response(200, JSON, echo), clock))
    assert "tokens_in" not in sink.one()


class PipedBody:
    """A pipeable upstream body (as the pools give): ``push`` sends a chunk to the sink."""

    length = None

    def __init__(self) -> None:
        self.sink: BodySink | None = None
        self.aborted = False

    def pipe(self, sink: BodySink) -> None:
        self.sink = sink

    def push(self, chunk: bytes) -> None:
        assert self.sink is not None
        self.sink.write(chunk)

    def pause_producing(self) -> None:
        pass

    def resume_producing(self) -> None:
        pass

    def abort(self) -> None:
        self.aborted = True

    def __aiter__(self) -> PipedBody:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration


class ClientSink:
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


async def piped(clock: FakeClock, sink: Recorder, upstream: PipedBody) -> tuple[Request, ClientSink]:
    access = AccessLog(clock, LogConfig(), sink)
    request = make_request(clock)
    response = await access(request, serve(Response(200, SSE, upstream), clock, took=0.030))
    body = response.body
    assert callable(getattr(body, "pipe", None))  # still pipeable: the front pipes it, no task per chunk
    client = ClientSink()
    cast(PipeableBody, body).pipe(client)
    return request, client


async def test_a_piped_stream_is_counted_and_logged_at_its_end() -> None:
    clock, sink, upstream = FakeClock(), Recorder(), PipedBody()
    _, client = await piped(clock, sink, upstream)
    parts = [delta("Hel"), delta("lo"), USAGE_EVENT, DONE]
    for part in parts:
        clock.advance(0.010)
        upstream.push(part)
    assert client.data == parts and sink.entries == []
    assert upstream.sink is not None
    upstream.sink.finish()
    assert client.finished
    fields = sink.one()
    assert (fields["bytes_out"], fields["tokens_in"], fields["tokens_out"]) == (sum(map(len, parts)), 11, 3)
    assert (fields["ttft_ms"], fields["duration_ms"]) == (40.0, 70.0)
    assert "outcome" not in fields


async def test_a_piped_stream_whose_client_left_is_logged_client_closed() -> None:
    clock, sink, upstream = FakeClock(), Recorder(), PipedBody()
    request, _ = await piped(clock, sink, upstream)
    upstream.push(delta("a"))
    request.ctx.disconnected = True
    response_body = upstream.sink  # the wrapper the front pipes; the front aborts it
    assert response_body is not None
    response_body.abort()  # type: ignore[attr-defined]
    assert upstream.aborted  # passed on: the upstream call stops
    fields = sink.one()
    assert (fields["status"], fields["outcome"], fields["bytes_out"]) == (
        200,
        "client_closed",
        len(delta("a")),
    )


async def test_a_piped_stream_the_upstream_broke_off_is_logged_upstream_failed() -> None:
    clock, sink, upstream = FakeClock(), Recorder(), PipedBody()
    _, client = await piped(clock, sink, upstream)
    upstream.push(delta("a"))
    assert upstream.sink is not None
    upstream.sink.fail(UpstreamClosed("the upstream closed the connection"))
    assert isinstance(client.failed, UpstreamClosed)  # passed on to the front
    fields = sink.one()
    assert (fields["outcome"], fields["error_type"]) == ("upstream_failed", "upstream_connection_closed")
    assert "tokens_in" not in fields


@pytest.mark.parametrize(
    ("answer", "tokens"),
    [
        ({"choices": [], "usage": USAGE}, (11, 3)),
        ({"choices": [], "usage": USAGE, "prompt_logprobs": None, "kv": {"a": 1}}, (11, 3)),  # vLLM-like
        ({"usage": USAGE, "tools": [{"usage": {"prompt_tokens": 999, "completion_tokens": 999}}]}, (11, 3)),
        ({"usage": {"input_tokens": 5, "output_tokens": 6, "output_tokens_details": {"r": 0}}}, (5, 6)),
        ({"choices": [{"message": {"content": '"usage": {"prompt_tokens": 7}}'}}]}, None),  # in a string
    ],
    ids=["last", "followed", "nested-echo-after", "responses-api", "quoted"],
)
async def test_the_top_level_usage_of_a_whole_answer(answer: object, tokens: tuple[int, int] | None) -> None:
    clock, sink = FakeClock(), Recorder()
    access = AccessLog(clock, LogConfig(), sink)
    await access(make_request(clock), serve(Response(200, JSON, orjson.dumps(answer)), clock))
    fields = sink.one()
    assert (None if "tokens_in" not in fields else (fields["tokens_in"], fields["tokens_out"])) == tokens
