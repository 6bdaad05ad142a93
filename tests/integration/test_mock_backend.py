"""The mock backend as a real process, driven by the official openai SDK and raw HTTP clients."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from bench.mock_backend import AnswerLog
from tests.integration.mock_proc import MockProcess

GREETING = "Hello, this is the mock backend."
USER: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "x" * 40}
]  # 40 characters: prompt_tokens == 11


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProcess]:
    with MockProcess() as proc:
        yield proc


@pytest.fixture(autouse=True)
def _fresh_mock(mock: MockProcess) -> None:
    mock.reset()


@pytest.fixture
def client(mock: MockProcess) -> Iterator[OpenAI]:
    with OpenAI(base_url=mock.base_url, api_key="x", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def aclient(mock: MockProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=mock.base_url, api_key="x", max_retries=0) as sdk:
        yield sdk


@contextmanager
def raw_chat_stream(
    mock: MockProcess, knobs: dict[str, str], read_timeout: float = 5.0
) -> Iterator[httpx.Response]:
    """A streaming chat completion through plain httpx: the response, open, before its body is read."""
    body = {"model": "m", "messages": USER, "stream": True}
    url = mock.base_url + "/chat/completions"
    with (
        httpx.Client(timeout=httpx.Timeout(5.0, read=read_timeout)) as http,
        http.stream("POST", url, json=body, headers=knobs) as response,
    ):
        yield response


def sse_events(response: httpx.Response) -> Iterator[str]:
    """The non-empty SSE lines of a streaming response."""
    return (line for line in response.iter_lines() if line)


# ---- OpenAI endpoints through the SDK -------------------------------------------------------------


def test_chat_non_stream(client: OpenAI) -> None:
    reply = client.chat.completions.create(model="llama-3.1-8b", messages=USER, max_tokens=5)
    assert reply.object == "chat.completion"
    assert reply.model == "llama-3.1-8b"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "Hello, this is the"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (11, 5, 16)


def test_chat_stream_with_usage(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="m",
        messages=USER,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-chunks": "6"},
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 6
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == "Hello, this is the mock"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6 and chunks[-1].usage.prompt_tokens == 11
    assert {c.id for c in chunks} == {chunks[0].id}


async def test_async_chat_stream_and_non_stream(aclient: AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model="m",
        messages=USER,
        stream=True,
        max_tokens=3,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, this"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    reply = await aclient.chat.completions.create(model="m", messages=USER)
    assert reply.choices[0].message.content == GREETING


def test_completions(client: OpenAI) -> None:
    reply = client.completions.create(model="m", prompt="abcdefgh", max_tokens=2)
    assert (reply.object, reply.choices[0].text, reply.model) == ("text_completion", "Hello,", "m")
    assert reply.usage is not None and reply.usage.prompt_tokens == 3
    stream = client.completions.create(
        model="m", prompt="p", stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == GREETING
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_content_bytes(client: OpenAI) -> None:
    big = {"x-mock-content-bytes": "1000"}
    reply = client.chat.completions.create(model="m", messages=USER, extra_headers=big)
    assert len(reply.choices[0].message.content or "") == 1000
    stream = client.chat.completions.create(
        model="m",
        messages=USER,
        stream=True,
        extra_headers={**big, "x-mock-chunks": "3"},
    )
    sizes = [len(c.choices[0].delta.content or "") for c in stream if c.choices[0].delta.content]
    assert sizes == [1000, 1000, 1000]


def test_embeddings(client: OpenAI) -> None:
    first = client.embeddings.create(model="embed", input=["alpha", "beta"])  # SDK asks for base64
    again = client.embeddings.create(model="embed", input="alpha", encoding_format="float")
    alpha, beta = (item.embedding for item in first.data)
    assert len(alpha) == 8 and alpha == again.data[0].embedding and alpha != beta
    assert math.isclose(math.fsum(x * x for x in alpha), 1.0, rel_tol=1e-5)
    assert first.model == "embed" and first.usage.prompt_tokens == 3
    wide = client.embeddings.create(model="embed", input="alpha", dimensions=16)
    assert len(wide.data[0].embedding) == 16


def test_models(client: OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["mock-model-v1", "mock-model-v2"]


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (429, openai.RateLimitError),
        (503, openai.InternalServerError),
    ],
)
def test_status_knob_raises_sdk_error(
    client: OpenAI, status: int, error: type[openai.APIStatusError]
) -> None:
    headers = {"x-mock-status": str(status), "x-mock-retry-after": "1.5"}
    with pytest.raises(error) as caught:
        client.chat.completions.create(model="m", messages=USER, extra_headers=headers)
    assert caught.value.status_code == status
    assert f"mock backend: injected status {status}" in caught.value.message
    assert caught.value.response.headers["retry-after"] == "1.5"
    assert caught.value.response.headers["retry-after-ms"] == "1500"
    if status == 429:
        assert caught.value.code == "rate_limit_exceeded"


def test_bad_knob_is_a_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="x-mock-chunks: expected an integer"):
        client.chat.completions.create(model="m", messages=USER, extra_headers={"x-mock-chunks": "many"})


# ---- faults ---------------------------------------------------------------------------------------


def test_stall_after_keeps_the_stream_open(mock: MockProcess) -> None:
    with raw_chat_stream(mock, {"x-mock-chunks": "10", "x-mock-stall-after": "2"}, read_timeout=0.3) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
        assert [next(events).startswith("data: {") for _ in range(2)] == [True, True]
        assert mock.stats()["in_flight"] == 1
        with pytest.raises(httpx.ReadTimeout):
            next(events)
    stats = mock.wait_stats(lambda s: s["disconnects"] == 1)
    assert stats["in_flight"] == 0 and stats["completed"] == 0


def test_stall_after_non_stream_sends_head_then_part_of_the_body(mock: MockProcess) -> None:
    with httpx.Client(timeout=httpx.Timeout(5.0, read=0.3)) as http:
        headers = {"x-mock-stall-after": "5"}
        with http.stream("GET", mock.base_url + "/models", headers=headers) as resp:
            assert resp.status_code == 200 and int(resp.headers["content-length"]) > 5
            with pytest.raises(httpx.ReadTimeout):
                resp.read()


def test_reset_after_aborts_the_connection(mock: MockProcess, client: OpenAI) -> None:
    with raw_chat_stream(mock, {"x-mock-chunks": "10", "x-mock-reset-after": "3"}) as resp:
        assert resp.status_code == 200
        events = sse_events(resp)
        assert len([next(events) for _ in range(3)]) == 3
        with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError)):
            next(events)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=USER, extra_headers={"x-mock-reset-after": "10"})
    stats = mock.wait_stats(lambda s: s["resets"] == 2)
    assert stats["disconnects"] == 0 and stats["in_flight"] == 0


def test_global_status_burst(mock: MockProcess, client: OpenAI) -> None:
    mock.set_faults(status_burst={"status": 503, "count": 2, "retry_after": 1.5})
    assert len(client.models.list().data) == 2  # faults apply to POST requests only
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="m", messages=USER)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "1.5"
    assert client.chat.completions.create(model="m", messages=USER).choices[0].message.content == GREETING
    assert mock.stats()["by_path"] == {"/v1/models": 1, "/v1/chat/completions": 3}


def test_global_reset_ratio_and_clear(mock: MockProcess, client: OpenAI) -> None:
    mock.set_faults(reset_ratio=1.0, seed=7)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="m", messages=USER)
    mock.clear_faults()
    assert client.chat.completions.create(model="m", messages=USER).choices[0].message.content == GREETING
    assert mock.wait_stats(lambda s: s["resets"] == 1)["completed"] == 1


def _chat_outcomes(client: OpenAI, n: int) -> list[int]:
    """Status of ``n`` chat completions (each with its own request id): 200 or the error's status."""
    out = []
    for i in range(n):
        try:
            client.chat.completions.create(model="m", messages=USER, extra_headers={"x-request-id": f"q{i}"})
            out.append(200)
        except openai.APIStatusError as e:
            assert e.response.headers["retry-after"] == "2" and e.code is None
            out.append(e.status_code)
    return out


def test_global_status_ratio_is_a_seeded_share(mock: MockProcess, client: OpenAI) -> None:
    mock.set_faults(status_ratio={"status": 502, "ratio": 0.3, "retry_after": 2}, seed=11)
    first = _chat_outcomes(client, 200)
    assert set(first) == {200, 502}
    assert 35 <= first.count(502) <= 85  # 60 expected; binomial sd 6.5
    assert len(client.models.list().data) == 2  # GET requests are spared
    stats = mock.stats()
    assert stats["completed"] == 201 and stats["answered"] == first.count(200) + 1
    mock.set_faults(status_ratio={"status": 502, "ratio": 0.3, "retry_after": 2}, seed=11)
    assert _chat_outcomes(client, 200) == first  # the same seed, the same requests fail
    mock.set_faults(status_ratio={"status": 502, "ratio": 0.3, "retry_after": 2}, seed=12)
    assert _chat_outcomes(client, 200) != first


def test_status_ratio_and_reset_ratio_share_the_seed(mock: MockProcess, client: OpenAI) -> None:
    mock.set_faults(status_ratio={"ratio": 0.2}, reset_ratio=0.2, seed=5)
    failures: list[str] = []
    for _ in range(100):
        try:
            client.chat.completions.create(model="m", messages=USER)
        except openai.InternalServerError as e:  # the default status: 503
            assert e.status_code == 503 and "retry-after" not in e.response.headers
            failures.append("status")
        except openai.APIConnectionError:
            failures.append("reset")
    stats = mock.wait_stats(lambda s: s["in_flight"] == 0)
    assert stats["resets"] == failures.count("reset") and 5 <= failures.count("reset") <= 40
    assert 5 <= failures.count("status") <= 40
    assert stats["answered"] == 100 - len(failures)


def test_status_header_wins_over_status_ratio(mock: MockProcess, client: OpenAI) -> None:
    mock.set_faults(status_ratio={"status": 503, "ratio": 1.0})
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="m", messages=USER, extra_headers={"x-mock-status": "429"})


@pytest.mark.parametrize(
    "faults",
    [
        {"reset_rate": 0.5},
        {"status_ratio": {"ratio": 1.5}},
        {"status_ratio": {"status": 700, "ratio": 0.1}},
        {"status_ratio": {"share": 0.1}},
        {"status_ratio": 0.1},
    ],
)
def test_bad_faults_are_rejected(mock: MockProcess, faults: dict[str, object]) -> None:
    with pytest.raises(httpx.HTTPStatusError) as caught:
        mock.set_faults(**faults)
    assert caught.value.response.status_code == 400
    if "reset_rate" in faults:
        assert "unknown keys ['reset_rate']" in caught.value.response.text


# ---- answers by request id --------------------------------------------------------------------------


def test_answers_are_counted_by_request_id(mock: MockProcess, client: OpenAI) -> None:
    def chat(request_id: str, stream: bool = False, knobs: dict[str, str] | None = None) -> None:
        headers = {"x-request-id": request_id, **(knobs or {})}
        if stream:
            list(client.chat.completions.create(model="m", messages=USER, stream=True, extra_headers=headers))
        else:
            client.chat.completions.create(model="m", messages=USER, extra_headers=headers)

    chat("twice")
    chat("twice", stream=True)  # the same id answered twice: once as a body, once as a stream
    chat("once")
    client.chat.completions.create(model="m", messages=USER)  # no id: counted in answered only
    with pytest.raises(openai.InternalServerError):
        chat("failed", knobs={"x-mock-status": "503"})  # not a 2xx
    chat("failed")  # so this is its only answer
    with pytest.raises(openai.APIConnectionError):
        chat("cut", knobs={"x-mock-reset-after": "5"})  # aborted: not answered
    with pytest.raises(openai.APIError):
        chat("cut", stream=True, knobs={"x-mock-reset-after": "2", "x-mock-chunks": "5"})
    with raw_chat_stream(
        mock, {"x-request-id": "left", "x-mock-chunks": "100", "x-mock-delay-ms": "20"}
    ) as r:
        assert next(sse_events(r)).startswith("data: {")  # the client leaves mid-stream: not answered
    stats = mock.wait_stats(lambda s: s["in_flight"] == 0 and s["disconnects"] == 1)
    assert (stats["answered"], stats["answered_twice"]) == (5, 1)
    chat("once")
    chat("twice")  # a third answer of "twice" does not count it again; "once" now counts
    stats = mock.stats()
    assert (stats["answered"], stats["answered_twice"]) == (7, 2)
    mock.reset()
    assert {k: mock.stats()[k] for k in ("answered", "answered_twice")} == {
        "answered": 0,
        "answered_twice": 0,
    }


def test_answer_log_is_bounded() -> None:
    log = AnswerLog(capacity=3)
    for request_id in ("a", "b", "c", "a", "d"):  # "a" answered again: "b" is now the oldest
        log.record(request_id)
    assert (log.answered, log.answered_twice, log.count("a"), log.count("b")) == (5, 1, 2, 0)
    log.record("b")  # forgotten, so not counted twice
    log.record(None)
    assert (log.answered, log.answered_twice, log.count("c")) == (7, 1, 0)
    assert len({k for k in "abcd" if log.count(k)}) == 3


# ---- echo, stats, disconnects -----------------------------------------------------------------------


def test_echo_of_an_arbitrary_path(mock: MockProcess) -> None:
    body = b'{"model": "gpt-4o-mini", "input": "hi"}'
    headers = {"content-type": "application/json", "x-request-id": "req-1", "x-custom": "yes"}
    echo = httpx.post(mock.base_url + "/responses?a=1&b=two", content=body, headers=headers).json()
    assert echo["object"] == "mock.echo"
    assert (echo["method"], echo["path"], echo["query"]) == ("POST", "/v1/responses", {"a": "1", "b": "two"})
    assert echo["headers"]["x-custom"] == "yes" and echo["headers"]["x-request-id"] == "req-1"
    assert echo["body_len"] == len(body) and echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert echo["model"] == "gpt-4o-mini"
    deleted = httpx.delete(mock.base_url + "/files/file-1").json()
    assert (deleted["method"], deleted["path"], deleted["model"]) == ("DELETE", "/v1/files/file-1", None)


def test_echo_of_a_multipart_upload_through_the_sdk(mock: MockProcess, client: OpenAI) -> None:
    audio = b"RIFF" + bytes(range(256)) * 4
    raw = client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("speech.wav", audio, "audio/wav")
    )
    echo = raw.http_response.json()
    assert (echo["path"], echo["model"]) == ("/v1/audio/transcriptions", "whisper-1")
    assert echo["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    assert echo["body_len"] > len(audio)


def test_stats_and_reset(mock: MockProcess, client: OpenAI) -> None:
    for i in range(3):
        client.chat.completions.create(model="m", messages=USER, extra_headers={"x-request-id": f"id-{i}"})
    stats = mock.stats()
    assert (stats["requests"], stats["completed"], stats["in_flight"]) == (3, 3, 0)
    assert stats["request_ids"] == ["id-0", "id-1", "id-2"]
    last = stats["last_request"]
    assert (last["method"], last["path"], last["json"]["messages"]) == ("POST", "/v1/chat/completions", USER)
    assert last["headers"]["authorization"] == "Bearer x"
    mock.reset()
    stats = mock.stats()
    assert (stats["requests"], stats["by_path"], stats["request_ids"], stats["last_request"]) == (
        0,
        {},
        [],
        None,
    )


def test_stream_disconnect_is_recorded_with_its_time(mock: MockProcess) -> None:
    with raw_chat_stream(mock, {"x-mock-chunks": "1000", "x-mock-delay-ms": "20"}) as resp:
        events = sse_events(resp)  # kept: dropping a started line iterator closes the connection
        assert next(events).startswith("data: {")
        closed_at = time.monotonic()  # leaving the block closes the connection mid-stream
    stats = mock.wait_stats(lambda s: s["disconnects"] == 1)
    assert 0 <= stats["disconnect_times"][-1] - closed_at < 0.1
    assert stats["completed"] == 0 and stats["in_flight"] == 0


def test_slow_non_stream_disconnect_is_recorded(mock: MockProcess, client: OpenAI) -> None:
    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.2).chat.completions.create(
            model="m",
            messages=USER,
            extra_headers={"x-mock-first-byte-ms": "5000"},
        )
    assert mock.wait_stats(lambda s: s["disconnects"] == 1)["completed"] == 0


async def test_async_sdk_closing_a_stream_is_a_disconnect(mock: MockProcess, aclient: AsyncOpenAI) -> None:
    stream = await aclient.chat.completions.create(
        model="m",
        messages=USER,
        stream=True,
        extra_headers={"x-mock-chunks": "500", "x-mock-delay-ms": "10"},
    )
    async for chunk in stream:
        assert chunk.choices[0].delta.role == "assistant"
        break
    await stream.close()
    assert mock.wait_stats(lambda s: s["disconnects"] == 1)["in_flight"] == 0


def test_sigterm_exits_cleanly() -> None:
    proc = MockProcess().start()
    assert httpx.get(proc.base_url + "/models").status_code == 200
    assert proc.port > 0 and proc.url == f"http://127.0.0.1:{proc.port}"
    assert proc.stop() == 0
