"""The official openai SDK pointed at a real sidecar subprocess in front of the real mock backend."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config

GREETING = "Hello, this is the mock backend."
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture(autouse=True)
def _fresh_mock(mock: MockProcess) -> None:
    mock.reset()


@pytest.fixture
def client(sidecar: SidecarProcess) -> Iterator[OpenAI]:
    with OpenAI(base_url=sidecar.base_url, api_key="sk-client", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def aclient(sidecar: SidecarProcess) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=sidecar.base_url, api_key="sk-client", max_retries=0) as sdk:
        yield sdk


def upstream_seen(mock: MockProcess) -> dict[str, object]:
    last: dict[str, object] = mock.stats()["last_request"]
    return last


# ---- the happy paths -------------------------------------------------------------------------


def test_chat_non_stream_rewrites_the_model_for_the_upstream(client: OpenAI, mock: MockProcess) -> None:
    reply = client.chat.completions.create(model="demo-model", messages=HI)
    assert reply.choices[0].message.content == GREETING
    seen = upstream_seen(mock)
    assert seen["path"] == "/v1/chat/completions"
    assert seen["json"] == {"model": "mock-model-v1", "messages": HI}


def test_chat_stream_arrives_chunk_by_chunk_with_usage(client: OpenAI, mock: MockProcess) -> None:
    stream = client.chat.completions.create(
        model="demo-model",
        messages=HI,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-chunks": "12"},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert len([p for p in pieces if p]) == 12
    assert usage is not None and usage.completion_tokens == 12
    assert upstream_seen(mock)["json"]["model"] == "mock-model-v1"  # type: ignore[index]


async def test_async_stream_and_non_stream(aclient: AsyncOpenAI) -> None:
    reply = await aclient.chat.completions.create(model="demo-model", messages=HI)
    assert reply.choices[0].message.content == GREETING
    stream = await aclient.chat.completions.create(model="demo-model", messages=HI, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == GREETING


async def test_many_concurrent_async_requests(aclient: AsyncOpenAI, mock: MockProcess) -> None:
    async def one(i: int) -> str:
        if i % 2:
            stream = await aclient.chat.completions.create(model="demo-model", messages=HI, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        reply = await aclient.chat.completions.create(model="demo-model", messages=HI)
        return reply.choices[0].message.content or ""

    results = await asyncio.gather(*(one(i) for i in range(200)))
    assert results == [GREETING] * 200
    assert mock.stats()["requests"] == 200


def test_legacy_completions(client: OpenAI, mock: MockProcess) -> None:
    reply = client.completions.create(model="demo-model", prompt="say hi", max_tokens=5)
    assert reply.choices[0].text
    assert upstream_seen(mock)["json"] == {"model": "mock-model-v1", "prompt": "say hi", "max_tokens": 5}


def test_embeddings(client: OpenAI, mock: MockProcess) -> None:
    result = client.embeddings.create(model="demo-model", input=["a", "b"])
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) > 0
    assert upstream_seen(mock)["path"] == "/v1/embeddings"


def test_models_are_the_configured_route_names(client: OpenAI, mock: MockProcess) -> None:
    assert [m.id for m in client.models.list()] == ["demo-model"]
    assert client.models.retrieve("demo-model").id == "demo-model"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("mock-model-v1")  # an upstream name is not what the client asks for
    assert caught.value.code == "model_not_found"
    assert mock.stats()["requests"] == 0  # answered by the sidecar


@pytest.mark.parametrize(
    "path",
    ["/v1/responses", "/v1/moderations", "/v1/images/generations", "/v1/audio/speech", "/v1/batches"],
)
def test_other_openai_paths_pass_through_with_the_model_rewritten(
    sidecar: SidecarProcess, mock: MockProcess, path: str
) -> None:
    body = {"model": "demo-model", "input": "x"}
    response = httpx.post(sidecar.url + path, json=body, timeout=5)
    assert response.status_code == 200, response.text
    seen = upstream_seen(mock)
    assert seen["path"] == path
    assert seen["json"] == {"model": "mock-model-v1", "input": "x"}


def test_multipart_audio_upload_gets_its_model_rewritten(client: OpenAI) -> None:
    audio = b"RIFF" + bytes(range(256)) * 4
    raw = client.audio.transcriptions.with_raw_response.create(
        model="demo-model", file=("a.wav", audio, "audio/wav")
    )
    echo = raw.http_response.json()  # the mock echoes what it received
    assert (echo["path"], echo["model"]) == ("/v1/audio/transcriptions", "mock-model-v1")
    assert echo["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    assert echo["body_len"] > len(audio)


def test_a_file_upload_without_a_model_goes_to_the_only_upstream(client: OpenAI, mock: MockProcess) -> None:
    client.files.create(file=("data.jsonl", b'{"a": 1}\n', "application/jsonl"), purpose="batch")
    assert upstream_seen(mock)["path"] == "/v1/files"


# ---- errors the SDK must parse ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", {"messages": HI}),
        ("/completions", {"prompt": "say hi"}),
        ("/embeddings", {"input": "x"}),
        ("/responses", {"input": "x"}),
        ("/audio/speech", {"input": "x", "voice": "alloy"}),
        ("/chat/completions", {"model": None, "messages": HI}),
    ],
)
def test_a_request_that_needs_a_model_and_names_none_is_400(
    client: OpenAI, mock: MockProcess, path: str, body: dict[str, object]
) -> None:
    # The SDK insists on a model for these; its generic post sends the body as given.
    with pytest.raises(openai.BadRequestError) as caught:
        client.post(path, body=body, cast_to=object)
    assert (caught.value.type, caught.value.param) == ("invalid_request_error", "model")
    assert "model" in caught.value.message
    assert mock.stats()["requests"] == 0  # not forwarded to the default upstream


@pytest.mark.parametrize("path", ["/v1/audio/transcriptions", "/v1/audio/translations"])
def test_an_audio_upload_without_a_model_is_400(
    sidecar: SidecarProcess, mock: MockProcess, path: str
) -> None:
    files = {"file": ("a.wav", b"RIFF" + bytes(64), "audio/wav")}
    response = httpx.post(sidecar.url + path, files=files, timeout=5)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "model"
    assert mock.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/moderations", {"input": "x"}),  # OpenAI: model optional (a default moderation model)
        ("/v1/images/generations", {"prompt": "a cat"}),  # optional (a default image model)
        ("/v1/responses", {"prompt": {"id": "pmpt_1"}, "input": "x"}),  # a stored prompt names it
    ],
)
def test_a_request_whose_model_is_optional_goes_to_the_default_upstream(
    sidecar: SidecarProcess, mock: MockProcess, path: str, body: dict[str, object]
) -> None:
    response = httpx.post(sidecar.url + path, json=body, timeout=5)
    assert response.status_code == 200, response.text
    seen = upstream_seen(mock)
    assert (seen["path"], seen["json"]) == (path, body)


def test_unknown_model_is_404_model_not_found(client: OpenAI, mock: MockProcess) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-unknown", messages=HI)
    assert caught.value.code == "model_not_found"
    assert caught.value.param == "model"
    assert "gpt-unknown" in caught.value.message
    assert mock.stats()["requests"] == 0


def test_bad_json_is_400(sidecar: SidecarProcess) -> None:
    response = httpx.post(
        sidecar.base_url + "/chat/completions",
        content=b'{"model": "demo-model",',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_a_non_string_model_is_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body={"model": 7, "messages": HI}, cast_to=object)
    assert caught.value.param == "model"


def test_paths_outside_v1_are_404(sidecar: SidecarProcess) -> None:
    response = httpx.get(sidecar.url + "/admin")
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "invalid_request_error"


def test_upstream_errors_pass_through_unchanged(client: OpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(
            model="demo-model", messages=HI, extra_headers={"x-mock-status": "429", "x-mock-retry-after": "2"}
        )
    assert caught.value.response.headers["retry-after"] == "2"
    assert caught.value.code == "rate_limit_exceeded"


def test_dead_upstream_is_502(tmp_path: Path) -> None:
    config = minimal_config("http://127.0.0.1:9")  # discard port: nothing listens
    with (
        SidecarProcess(config, tmp_path) as sidecar,
        OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0) as client,
        pytest.raises(openai.InternalServerError) as caught,
    ):
        client.chat.completions.create(model="demo-model", messages=HI)
    assert caught.value.status_code == 502
    assert caught.value.code == "upstream_connect_error"
    assert isinstance(caught.value.body, dict) and "127.0.0.1:9" not in str(caught.value.body)


def test_upstream_first_byte_timeout_is_504(mock: MockProcess, tmp_path: Path) -> None:
    config = minimal_config(mock.url, upstream_extra=", first_byte_timeout_s: 0.3")
    with (
        SidecarProcess(config, tmp_path) as sidecar,
        OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0) as client,
    ):
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(
                model="demo-model", messages=HI, extra_headers={"x-mock-first-byte-ms": "3000"}
            )
        assert caught.value.status_code == 504
        assert time.monotonic() - started < 2.5
        # The timed-out request is closed upstream, and the sidecar goes on serving.
        mock.wait_stats(lambda s: s["disconnects"] >= 1)
        assert client.chat.completions.create(model="demo-model", messages=HI).choices


# ---- streaming: no buffering, disconnects reach the upstream ----------------------------------


def test_stream_is_not_buffered(client: OpenAI) -> None:
    stream = client.chat.completions.create(
        model="demo-model",
        messages=HI,
        stream=True,
        extra_headers={"x-mock-chunks": "20", "x-mock-delay-ms": "10"},
    )
    arrivals = [time.monotonic() for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
    assert len(arrivals) == 20
    spread = arrivals[-1] - arrivals[0]
    assert spread >= 0.17, f"20 chunks 10 ms apart arrived within {spread * 1000:.0f} ms: buffered"


async def test_closing_a_stream_closes_the_upstream_request(aclient: AsyncOpenAI, mock: MockProcess) -> None:
    stream = await aclient.chat.completions.create(
        model="demo-model",
        messages=HI,
        stream=True,
        extra_headers={"x-mock-chunks": "500", "x-mock-delay-ms": "20"},
    )
    async for _ in stream:
        break
    await stream.close()
    closed_at = time.monotonic()
    stats = await asyncio.to_thread(mock.wait_stats, lambda s: s["disconnects"] == 1)
    assert stats["completed"] == 0
    assert stats["disconnect_times"][-1] - closed_at < 0.1


# ---- configuration seen end to end ------------------------------------------------------------


def test_upstream_api_key_replaces_the_clients(mock: MockProcess, tmp_path: Path) -> None:
    config = minimal_config(mock.url, upstream_extra=', api_key: "${UPSTREAM_KEY}"')
    with (
        SidecarProcess(config, tmp_path, env={"UPSTREAM_KEY": "sk-upstream-secret"}) as sidecar,
        OpenAI(base_url=sidecar.base_url, api_key="sk-client", max_retries=0) as client,
    ):
        raw = client.chat.completions.with_raw_response.create(model="demo-model", messages=HI)
        assert "sk-upstream-secret" not in str(raw.headers)
    headers = upstream_seen(mock)["headers"]
    assert isinstance(headers, dict)
    assert headers["authorization"] == "Bearer sk-upstream-secret"


def test_weights_split_traffic_between_targets(mock: MockProcess, tmp_path: Path) -> None:
    config = (
        'listen: {address: "127.0.0.1:0"}\n'
        f"upstreams: {{mock: {{url: '{mock.url}'}}}}\n"
        "routes:\n"
        "  - model: demo-model\n"
        "    targets:\n"
        "      - {upstream: mock, model: mock-model-v1, weight: 80}\n"
        "      - {upstream: mock, model: mock-model-v2, weight: 20}\n"
        "  - model: only-v2\n"
        "    targets: [{upstream: mock, model: mock-model-v2}]\n"
    )
    with (
        SidecarProcess(config, tmp_path) as sidecar,
        OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0) as client,
    ):
        models = [client.chat.completions.create(model="demo-model", messages=HI).model for _ in range(200)]
        assert client.chat.completions.create(model="only-v2", messages=HI).model == "mock-model-v2"
        assert sorted(m.id for m in client.models.list()) == ["demo-model", "only-v2"]
    v2 = models.count("mock-model-v2")
    assert models.count("mock-model-v1") + v2 == 200
    assert 20 <= v2 <= 65, f"expected ~40 of 200 on the 20 % target, got {v2}"


def test_middleware_from_yaml_builtin_and_user_class(mock: MockProcess, tmp_path: Path) -> None:
    extra = (
        "middleware:\n"
        "  - type: headers\n"
        "    request_set: {x-team: search}\n"
        "    request_remove: [x-debug]\n"
        "    response_set: {x-served-by: llm-sidecar}\n"
        '  - type: "tests.unit.sample_middleware:Sample"\n'
        "    header: x-sample\n"
    )
    with (
        SidecarProcess(minimal_config(mock.url, extra=extra), tmp_path) as sidecar,
        OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0) as client,
    ):
        sidecar.wait_log("chain: headers → tests.unit.sample_middleware:Sample → forward")
        raw = client.chat.completions.with_raw_response.create(
            model="demo-model", messages=HI, extra_headers={"x-debug": "1"}
        )
        assert raw.headers["x-served-by"] == "llm-sidecar"
        assert raw.headers["x-sample"] == "1"
    headers = upstream_seen(mock)["headers"]
    assert isinstance(headers, dict)
    assert headers["x-team"] == "search"
    assert "x-debug" not in headers


def test_access_log_has_one_line_per_request(mock: MockProcess, tmp_path: Path) -> None:
    config = minimal_config(mock.url, extra="log: {access_log: true}\n")
    with (
        SidecarProcess(config, tmp_path) as sidecar,
        OpenAI(base_url=sidecar.base_url, api_key="sk-secret-client-key", max_retries=0) as client,
    ):
        client.chat.completions.create(model="demo-model", messages=HI, extra_headers={"x-request-id": "r-1"})
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="nope", messages=HI, extra_headers={"x-request-id": "r-2"})
        logs = sidecar.wait_log(" r-2 127.0.0.1:")  # written by the log thread a moment later
        lines = [x for x in logs.splitlines() if "llm_sidecar.access" in x]
    assert len(lines) == 2
    assert " r-1 127.0.0.1:" in lines[0] and '"POST /v1/chat/completions" 200 mock/mock-model-v1 ' in lines[0]
    assert '"POST /v1/chat/completions" 404 - ' in lines[1]
    assert "sk-secret-client-key" not in sidecar.logs()


def test_a_stream_that_stalls_is_cut_after_read_timeout(mock: MockProcess, tmp_path: Path) -> None:
    config = minimal_config(mock.url, upstream_extra=", read_timeout_s: 0.4, first_byte_timeout_s: 0.4")
    with (
        SidecarProcess(config, tmp_path) as sidecar,
        OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0) as client,
    ):
        # Twice on one pooled connection: the timer of the first exchange must not miss the second.
        for _ in range(2):
            stream = client.chat.completions.create(
                model="demo-model", messages=HI, stream=True, extra_headers={"x-mock-stall-after": "3"}
            )
            started = time.monotonic()
            with pytest.raises(openai.APIError) as cut:  # an error event, not an end that looks complete
                for _chunk in stream:
                    pass
            assert not isinstance(cut.value, openai.APIConnectionError)
            assert isinstance(cut.value.body, dict) and cut.value.body["code"] == "upstream_timeout"
            assert time.monotonic() - started < 3
        # Slow but steady (gaps below read_timeout_s) is not cut, nor is a quick non-stream call.
        steady = client.chat.completions.create(
            model="demo-model",
            messages=HI,
            stream=True,
            extra_headers={"x-mock-chunks": "6", "x-mock-delay-ms": "150"},
        )
        assert "".join(c.choices[0].delta.content or "" for c in steady if c.choices).count(" ") >= 1
        assert client.chat.completions.create(model="demo-model", messages=HI).choices


def test_a_cancellation_inside_the_chain_is_a_500_and_the_connection_goes_on(
    mock: MockProcess, tmp_path: Path
) -> None:
    extra = 'middleware:\n  - {type: "tests.unit.sample_middleware:Cancels", when: "cancel"}\n'
    with (
        SidecarProcess(minimal_config(mock.url, extra=extra), tmp_path) as sidecar,
        OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0, timeout=5) as client,
    ):
        with pytest.raises(openai.InternalServerError):  # an answer, not a hang
            client.chat.completions.create(
                model="demo-model", messages=HI, extra_headers={"x-test": "cancel"}
            )
        assert client.chat.completions.create(model="demo-model", messages=HI).choices  # same connection
