"""``rate_limit`` in process (memory backend, fake clock): headers, 429s, estimates, the usage
request, settlement through bytes and streamed bodies; and the OpenAI header formats."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Mapping

import orjson
import pytest

from middleware.rate_limit.config import RateLimitConfig
from middleware.rate_limit.estimate import Estimate, estimate
from middleware.rate_limit.headers import duration, retry_headers
from middleware.rate_limit.memory import MemoryBackend
from middleware.rate_limit.middleware import RateLimit
from proxy.clock import FakeClock
from proxy.errors import RateLimited, UpstreamTimeout
from proxy.http import Headers, Request, RequestContext, Response
from proxy.identity import Identity, KeyLimits, set_identity
from proxy.registry import BuildContext

USAGE = {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
HI = [{"role": "user", "content": "x" * 40}]  # "user" + 40 chars: 11 tokens at 4 chars each


def chat(
    body: Mapping[str, object], identity: Identity | None = None, path: str = "/v1/chat/completions"
) -> Request:
    ctx = RequestContext(b"rid", "127.0.0.1:1", 0.0)
    headers = Headers([(b"content-type", b"application/json")])
    request = Request("POST", path.encode(), headers, orjson.dumps(body), ctx)
    if identity is not None:
        set_identity(request, identity)
    return request


def json_reply(usage: dict[str, int] | None = USAGE, status: int = 200) -> Callable[[Request], Response]:
    def reply(request: Request) -> Response:
        payload: dict[str, object] = {"choices": []}
        if usage is not None:
            payload["usage"] = usage
        return Response.json(status, payload)

    return reply


class Next:
    def __init__(self, reply: Callable[[Request], Response]) -> None:
        self.reply = reply
        self.seen: list[Request] = []

    async def __call__(self, request: Request) -> Response:
        self.seen.append(request)
        return self.reply(request)


def limiter(clock: FakeClock, **options: object) -> RateLimit:
    config = RateLimitConfig(**options)  # type: ignore[arg-type]
    return RateLimit(config, BuildContext(clock, random.Random(1), ("demo-model",)))


def header(response: Response, name: str) -> str:
    value = response.headers.get(name.encode())
    assert value is not None, f"no {name}"
    return value.decode()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


async def test_every_answer_carries_openai_rate_limit_headers(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_minute=60, tokens_per_minute=6000, burst=0.5)
    response = await rl(chat({"model": "demo-model", "messages": HI, "max_tokens": 20}), Next(json_reply()))
    assert {k.decode(): v.decode() for k, v in response.headers if k.startswith(b"x-ratelimit")} == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "29",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "2969",  # 3000 - (11 prompt + 20 max_tokens)
        "x-ratelimit-reset-tokens": "310ms",
    }


async def test_over_the_limit_is_a_429_with_retry_after(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_minute=60, burst=1 / 60)  # a bucket of one request
    upstream = Next(json_reply())
    await rl(chat({"model": "demo-model", "messages": HI}), upstream)
    clock.advance(0.25)
    with pytest.raises(RateLimited) as info:
        await rl(chat({"model": "demo-model", "messages": HI}), upstream)
    err = info.value
    assert (err.status, err.code, err.type) == (429, "rate_limit_exceeded", "requests")
    headers = dict(err.headers)
    assert (headers[b"retry-after"], headers[b"retry-after-ms"]) == (b"1", b"750")
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert "Limit 60" in err.message and "750ms" in err.message
    assert len(upstream.seen) == 1


async def test_tokens_are_reserved_then_settled_with_the_real_usage(clock: FakeClock) -> None:
    rl = limiter(clock, tokens_per_minute=60, burst=100)  # 6000 tokens, 1 token/s
    first = await rl(chat({"model": "demo-model", "messages": HI, "max_tokens": 100}), Next(json_reply()))
    assert header(first, "x-ratelimit-remaining-tokens") == str(6000 - 111)
    second = await rl(chat({"model": "demo-model", "messages": HI, "max_tokens": 100}), Next(json_reply()))
    assert header(second, "x-ratelimit-remaining-tokens") == str(6000 - 12 - 111)  # the first settled at 12


async def test_an_error_answer_or_failure_gives_the_tokens_and_slot_back(clock: FakeClock) -> None:
    rl = limiter(clock, tokens_per_minute=60, burst=100, max_in_flight=1)
    assert isinstance(rl.backend, MemoryBackend)
    await rl(chat({"model": "demo-model", "messages": HI}), Next(json_reply(status=500)))

    def fail(request: Request) -> Response:
        raise UpstreamTimeout("slow")

    with pytest.raises(UpstreamTimeout) as info:
        await rl(chat({"model": "demo-model", "messages": HI}), Next(fail))
    assert b"x-ratelimit-remaining-tokens" in dict(info.value.headers)  # error answers carry them too
    assert rl.backend.in_flight("anonymous") == 0
    last = await rl(chat({"model": "demo-model", "messages": HI, "max_tokens": 10}), Next(json_reply()))
    assert header(last, "x-ratelimit-remaining-tokens") == str(6000 - 21)


async def test_a_stream_asks_for_usage_hides_it_and_settles_at_its_end(clock: FakeClock) -> None:
    usage_chunk = b"data: " + orjson.dumps({"choices": [], "usage": USAGE}) + b"\n\n"
    content = b'data: {"choices":[{"delta":{"content":"hi"}}]}\n\n'

    async def chunks() -> AsyncIterator[bytes]:
        for c in (content, usage_chunk, b"data: [DONE]\n\n"):
            yield c

    def reply(request: Request) -> Response:
        return Response(200, Headers([(b"content-type", b"text/event-stream")]), chunks())

    rl = limiter(clock, tokens_per_minute=60, burst=100, max_in_flight=5)
    assert isinstance(rl.backend, MemoryBackend)
    upstream = Next(reply)
    response = await rl(
        chat({"model": "demo-model", "messages": HI, "stream": True, "max_tokens": 50}), upstream
    )
    assert upstream.seen[0].json()["stream_options"] == {"include_usage": True}
    assert rl.backend.in_flight("anonymous") == 1  # held until the stream ends
    assert not isinstance(response.body, bytes)
    assert b"".join([c async for c in response.body]) == content + b"data: [DONE]\n\n"
    assert rl.backend.in_flight("anonymous") == 0
    again = await rl(chat({"model": "demo-model", "messages": HI, "max_tokens": 10}), Next(json_reply()))
    assert header(again, "x-ratelimit-remaining-tokens") == str(6000 - 12 - 21)


async def test_a_client_that_asked_for_usage_keeps_it(clock: FakeClock) -> None:
    rl = limiter(clock, tokens_per_minute=60, burst=100)
    upstream = Next(json_reply())
    body = {"model": "demo-model", "messages": HI, "stream": True, "stream_options": {"include_usage": True}}
    await rl(chat(body), upstream)
    assert upstream.seen[0].body == orjson.dumps(body)  # unchanged


async def test_per_key_limits_and_per_tenant_buckets(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_minute=600, burst=1 / 600)  # one request per bucket
    a = Identity("a", "acme", None)
    b = Identity("b", "acme", None)
    c = Identity("c", "other", None, KeyLimits(requests_per_minute=120))  # a bucket of 2 (burst: 1/600)
    body = {"model": "demo-model", "messages": HI}
    await rl(chat(body, a), Next(json_reply()))
    with pytest.raises(RateLimited):  # same tenant, same bucket
        await rl(chat(body, b), Next(json_reply()))
    ok = await rl(chat(body, c), Next(json_reply()))
    assert header(ok, "x-ratelimit-limit-requests") == "120"


async def test_no_limits_configured_means_no_headers_and_no_change(clock: FakeClock) -> None:
    rl = limiter(clock)
    upstream = Next(json_reply())
    response = await rl(chat({"model": "demo-model", "messages": HI, "stream": True}), upstream)
    assert not any(k.startswith(b"x-ratelimit") for k, _ in response.headers)
    assert "stream_options" not in upstream.seen[0].json()


async def test_too_large_a_request_is_told_not_to_retry(clock: FakeClock) -> None:
    rl = limiter(clock, tokens_per_minute=1000, burst=0.1)
    with pytest.raises(RateLimited) as info:
        await rl(chat({"model": "demo-model", "messages": HI, "max_tokens": 500}), Next(json_reply()))
    assert info.value.type == "tokens" and (b"x-should-retry", b"false") in info.value.headers
    assert b"retry-after" not in dict(info.value.headers)


def test_estimates() -> None:
    assert estimate({"messages": HI, "max_tokens": 9}, "/v1/chat/completions", 4.0, 100) == Estimate(11, 9)
    assert estimate({"messages": HI}, "/v1/chat/completions", 4.0, 100) == Estimate(11, 100)
    assert estimate(
        {"messages": HI, "max_completion_tokens": 3, "n": 2}, "/v1/chat/completions", 4.0, 9
    ) == Estimate(11, 6)
    assert estimate({"prompt": [1, 2, 3], "max_tokens": 1}, "/v1/completions", 4.0, 9) == Estimate(3, 1)
    assert estimate({"input": "abcdefgh"}, "/v1/embeddings", 4.0, 9) == Estimate(2, 0)
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:" + "A" * 10000}}]}
    assert estimate({"messages": [image], "max_tokens": 1}, "/v1/chat/completions", 4.0, 9) == Estimate(4, 1)


def test_go_durations_and_retry_headers() -> None:
    cases = {0: "0s", 0.0004: "1ms", 0.02: "20ms", 1: "1s", 1.5: "1.5s", 59.9991: "1m0s", 360: "6m0s"}
    cases |= {61.25: "1m1.25s", 3600: "1h0m0s", 7322.5: "2h2m2.5s"}
    assert {s: duration(s) for s in cases} == cases
    assert retry_headers(0.0201) == [(b"retry-after", b"1"), (b"retry-after-ms", b"21")]
    assert retry_headers(2.5) == [(b"retry-after", b"3"), (b"retry-after-ms", b"2500")]


async def test_names_no_route_serves_share_one_bucket(clock: FakeClock) -> None:
    rl = limiter(clock, requests_per_minute=600, burst=1 / 600)  # one request per bucket
    await rl(chat({"model": "typo-1", "messages": HI}), Next(json_reply()))
    with pytest.raises(RateLimited):  # not a bucket of its own per made-up name
        await rl(chat({"model": "typo-2", "messages": HI}), Next(json_reply()))
    await rl(chat({"model": "demo-model", "messages": HI}), Next(json_reply()))
    assert isinstance(rl.backend, MemoryBackend)
    assert sorted(model for _, model in rl.backend._buckets) == ["-", "demo-model"]


async def test_what_the_sidecar_answers_itself_is_not_limited(clock: FakeClock) -> None:
    """/v1/models and /v1/models/{id}: no slot, no request from the bucket, no headers."""
    rl = limiter(clock, requests_per_minute=600, burst=1 / 600, max_in_flight=1)  # one request
    assert isinstance(rl.backend, MemoryBackend)
    backend = rl.backend
    seen_in_flight = []

    def listing(request: Request) -> Response:
        seen_in_flight.append(backend.in_flight("anonymous"))
        return Response.json(200, {"object": "list", "data": []})

    for path in ("/v1/models", "/v1/models/demo-model", "/v1/models", "/v1/models/x"):
        answer = await rl(chat({}, path=path), Next(listing))
        assert not [name for name, _ in answer.headers if name.startswith(b"x-ratelimit")]
    assert seen_in_flight == [0, 0, 0, 0] and backend._buckets.currsize == 0
    await rl(chat({"model": "demo-model", "messages": HI}), Next(json_reply()))  # the bucket's one
    with pytest.raises(RateLimited):  # a path that merely starts alike is a model request
        await rl(chat({"model": "demo-model", "messages": HI}, path="/v1/modelsx"), Next(json_reply()))
