"""``auth`` and ``rate_limit`` through a real sidecar process, with the official openai SDK as the
client and the real mock backend behind; the rate limit with both the memory and the Redis store."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
SECOND_ROUTE = "  - model: second-model\n    targets:\n      - {upstream: mock, model: mock-model-v2}\n"
KEYS = f"""\
  - type: auth
    keys:
      - {{id: alice, key: sk-alice, tenant: acme}}
      - {{id: bob, key: "sha256:{hashlib.sha256(b"sk-bob").hexdigest()}", models: [second-model]}}
"""


@pytest.fixture(autouse=True)
def _fresh_mock(mock: MockProcess) -> None:
    mock.reset()


def sidecar_with(
    mock: MockProcess, tmp_path: Path, middleware: str, upstream_extra: str = ""
) -> SidecarProcess:
    config = minimal_config(
        mock.url, extra=SECOND_ROUTE + "middleware:\n" + middleware, upstream_extra=upstream_extra
    )
    return SidecarProcess(config, tmp_path)


def rate_limit(backend: str, redis_url: str, redis_prefix: str, **options: object) -> str:
    lines = [f"  - type: rate_limit\n    backend: {backend}\n"]
    if backend == "redis":
        lines.append(f'    redis: {{url: "{redis_url}", key_prefix: "{redis_prefix}", timeout_ms: 500}}\n')
    lines += [f"    {name}: {value}\n" for name, value in options.items()]
    return "".join(lines)


def sdk(sidecar: SidecarProcess, key: str = "sk-alice", retries: int = 0) -> OpenAI:
    return OpenAI(base_url=sidecar.base_url, api_key=key, max_retries=retries)


def header(response: object, name: str) -> int:
    headers: httpx.Headers = response.headers  # type: ignore[attr-defined]
    return int(headers[name])


# -- auth -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def auth_sidecar(mock: MockProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    upstream_key = ', api_key: "sk-upstream-own"'
    with sidecar_with(mock, tmp_path_factory.mktemp("auth"), KEYS, upstream_extra=upstream_key) as proc:
        yield proc


def test_a_missing_or_wrong_key_is_an_authentication_error(
    auth_sidecar: SidecarProcess, mock: MockProcess
) -> None:
    with sdk(auth_sidecar, "sk-wrong") as client, pytest.raises(openai.AuthenticationError) as info:
        client.chat.completions.create(model="demo-model", messages=HI)
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    missing = httpx.post(
        auth_sidecar.base_url + "/chat/completions", json={"model": "demo-model", "messages": HI}
    )
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert mock.stats()["requests"] == 0
    assert "sk-wrong" not in auth_sidecar.logs()


def test_a_model_the_key_may_not_use_is_permission_denied(auth_sidecar: SidecarProcess) -> None:
    with sdk(auth_sidecar, "sk-bob") as client:
        with pytest.raises(openai.PermissionDeniedError) as info:
            client.chat.completions.create(model="demo-model", messages=HI)
        assert info.value.status_code == 403 and info.value.code == "model_not_allowed"
        assert client.chat.completions.create(model="second-model", messages=HI).choices
        assert [m.id for m in client.models.list()] == ["second-model"]
    with sdk(auth_sidecar) as client:
        assert sorted(m.id for m in client.models.list()) == ["demo-model", "second-model"]
    with sdk(auth_sidecar, "sk-nobody") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_the_clients_key_never_reaches_the_upstream(auth_sidecar: SidecarProcess, mock: MockProcess) -> None:
    httpx.post(
        auth_sidecar.base_url + "/chat/completions",
        json={"model": "demo-model", "messages": HI},
        headers={"authorization": "Bearer sk-alice", "api-key": "sk-alice"},
    ).raise_for_status()
    seen = mock.stats()["last_request"]["headers"]
    assert seen["authorization"] == "Bearer sk-upstream-own"  # the upstream's own key, injected
    assert "api-key" not in seen and "sk-alice" not in str(seen)


# -- rate_limit, memory and Redis -------------------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_headers_on_every_answer_and_a_429_the_sdk_understands(
    mock: MockProcess, tmp_path: Path, backend: str, redis_url: str, redis_prefix: str
) -> None:
    limits = rate_limit(
        backend, redis_url, redis_prefix, requests_per_minute=60, tokens_per_minute=60000, burst=0.05
    )
    with sidecar_with(mock, tmp_path, KEYS + limits) as sidecar, sdk(sidecar) as client:
        raw = client.chat.completions.with_raw_response.create(model="demo-model", messages=HI, max_tokens=10)
        assert raw.parse().choices
        assert raw.headers["x-ratelimit-limit-requests"] == "60"
        assert raw.headers["x-ratelimit-remaining-requests"] == "2"  # a bucket of 3 (60 × 0.05)
        assert raw.headers["x-ratelimit-reset-requests"] == "1s"
        assert raw.headers["x-ratelimit-limit-tokens"] == "60000"
        assert int(raw.headers["x-ratelimit-remaining-tokens"]) == 3000 - 12  # "user" + "hi" → 2, + 10
        assert raw.headers["x-ratelimit-reset-tokens"].endswith("ms")
        client.chat.completions.create(model="demo-model", messages=HI, max_tokens=10)
        client.chat.completions.create(model="demo-model", messages=HI, max_tokens=10)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="demo-model", messages=HI, max_tokens=10)
    err = info.value
    assert (err.status_code, err.code, err.type) == (429, "rate_limit_exceeded", "requests")
    assert 1 <= int(err.response.headers["retry-after"]) <= 3
    assert 0 < int(err.response.headers["retry-after-ms"]) <= 3000
    assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert mock.stats()["requests"] == 3


def test_the_sdk_retries_after_retry_after_ms_and_succeeds(
    mock: MockProcess, tmp_path: Path, backend: str, redis_url: str, redis_prefix: str
) -> None:
    limits = rate_limit(
        backend, redis_url, redis_prefix, requests_per_minute=120, burst=0.001
    )  # 1 in the bucket
    with sidecar_with(mock, tmp_path, KEYS + limits) as sidecar, sdk(sidecar, retries=1) as client:
        client.chat.completions.create(model="demo-model", messages=HI)
        start = time.monotonic()
        raw = client.chat.completions.with_raw_response.create(model="demo-model", messages=HI)
        waited = time.monotonic() - start
    assert raw.parse().choices and raw.retries_taken == 1
    assert 0.3 < waited < 2.0  # the SDK slept retry-after-ms (≤ 500 ms), not its own backoff
    assert mock.stats()["requests"] == 2


def test_tokens_are_settled_with_the_real_usage(
    mock: MockProcess, tmp_path: Path, backend: str, redis_url: str, redis_prefix: str
) -> None:
    limits = rate_limit(backend, redis_url, redis_prefix, tokens_per_minute=60, burst=1000)  # 60000, 1/s
    with sidecar_with(mock, tmp_path, KEYS + limits) as sidecar, sdk(sidecar) as client:
        first = client.chat.completions.with_raw_response.create(
            model="demo-model", messages=HI, max_tokens=200
        )
        used = first.parse().usage
        assert used is not None and used.total_tokens == 1 + 200  # the mock: "hi" → 1, 200 generated
        reserved = 60000 - header(first, "x-ratelimit-remaining-tokens")
        assert reserved == 2 + 200
        second = client.chat.completions.with_raw_response.create(
            model="demo-model", messages=HI, max_tokens=200, extra_headers={"x-mock-chunks": "3"}
        )
        # Only the 201 really used were kept of the first reservation (± the refill meanwhile).
        assert 60000 - 201 - reserved - header(second, "x-ratelimit-remaining-tokens") in (0, -1)
        stream = client.chat.completions.create(
            model="demo-model", messages=HI, max_tokens=200, stream=True, extra_headers={"x-mock-chunks": "7"}
        )
        chunks = list(stream)
        third = client.chat.completions.with_raw_response.create(
            model="demo-model", messages=HI, max_tokens=200
        )
    # The stream's hidden usage chunk settled it: 1 + 7; the second: 1 + 3.
    assert all(c.usage is None and c.choices for c in chunks), "the injected usage chunk reached the client"
    assert 60000 - 201 - 4 - 8 - reserved - header(third, "x-ratelimit-remaining-tokens") in (0, -1, -2)
    assert mock.stats()["last_request"]["json"].get("stream_options") is None  # third: not a stream


def test_the_injected_usage_request_reaches_the_backend_and_not_the_client(
    mock: MockProcess, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    limits = rate_limit("memory", redis_url, redis_prefix, tokens_per_minute=60000)
    with sidecar_with(mock, tmp_path, KEYS + limits) as sidecar, sdk(sidecar) as client:
        chunks = list(
            client.chat.completions.create(model="demo-model", messages=HI, stream=True, max_tokens=5)
        )
        assert mock.stats()["last_request"]["json"]["stream_options"] == {"include_usage": True}
        assert [c for c in chunks if c.usage is not None or not c.choices] == []
        assert "".join(c.choices[0].delta.content or "" for c in chunks)
        asked = list(
            client.chat.completions.create(
                model="demo-model",
                messages=HI,
                stream=True,
                max_tokens=5,
                stream_options={"include_usage": True},
            )
        )
    usages = [c.usage for c in asked if c.usage is not None]
    assert len(usages) == 1 and usages[0].completion_tokens == 5  # asked for: kept


def test_an_aborted_stream_is_charged_what_was_generated(
    mock: MockProcess, tmp_path: Path, backend: str, redis_url: str, redis_prefix: str
) -> None:
    limits = rate_limit(backend, redis_url, redis_prefix, tokens_per_minute=60, burst=1000)
    knobs = {"x-mock-chunks": "400", "x-mock-delay-ms": "10"}
    with sidecar_with(mock, tmp_path, KEYS + limits) as sidecar, sdk(sidecar) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="demo-model", messages=HI, max_tokens=400, stream=True, extra_headers=knobs
        )
        before = header(raw, "x-ratelimit-remaining-tokens")
        stream = raw.parse()
        for i, _ in enumerate(stream):
            if i == 5:
                break
        stream.close()
        mock.wait_stats(lambda s: s["disconnects"] == 1)
        after = client.chat.completions.with_raw_response.create(
            model="demo-model", messages=HI, max_tokens=400
        )
    charged = before - header(after, "x-ratelimit-remaining-tokens")  # the first's charge (± refill)
    assert 2 + 5 <= charged <= 2 + 200, charged  # prompt + what had streamed, not the 402 reserved


def test_max_in_flight_per_key(mock: MockProcess, tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    limits = rate_limit("redis", redis_url, redis_prefix, max_in_flight=1)
    with sidecar_with(mock, tmp_path, KEYS + limits) as sidecar, sdk(sidecar) as client:
        slow = threading.Thread(
            target=client.chat.completions.create,
            kwargs={"model": "demo-model", "messages": HI, "extra_headers": {"x-mock-first-byte-ms": "600"}},
        )
        slow.start()
        mock.wait_stats(lambda s: s["in_flight"] == 1)
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="demo-model", messages=HI)
        assert "in progress" in info.value.message
        slow.join()
        assert client.chat.completions.create(model="demo-model", messages=HI).choices  # the slot is free


def test_a_sequential_client_alternating_models_is_never_refused(
    mock: MockProcess, tmp_path: Path, backend: str, redis_url: str, redis_prefix: str
) -> None:
    """One request at a time, two models in turn, listings in between: each finished request's
    slot is free for the next at once, whatever its model."""
    limits = rate_limit(backend, redis_url, redis_prefix, max_in_flight=1, requests_per_minute=6000)
    with sidecar_with(mock, tmp_path, KEYS + limits) as sidecar, sdk(sidecar) as client:
        for _ in range(4):
            for model in ("demo-model", "second-model"):
                assert client.chat.completions.create(model=model, messages=HI).choices
                assert len(client.models.list().data) == 2
    assert mock.stats()["requests"] == 8


def in_flight_on(sidecar: SidecarProcess, mock: MockProcess, first_byte_ms: int = 800) -> threading.Thread:
    """A slow request of alice through ``sidecar``, started and in progress at the mock."""

    def slow_request() -> None:
        with sdk(sidecar) as client:
            extra = {"x-mock-first-byte-ms": str(first_byte_ms)}
            client.chat.completions.create(model="demo-model", messages=HI, extra_headers=extra)

    slow = threading.Thread(target=slow_request)
    slow.start()
    mock.wait_stats(lambda s: s["in_flight"] == 1)
    return slow


def test_the_models_listing_takes_no_slot_and_no_request(
    mock: MockProcess, tmp_path: Path, backend: str, redis_url: str, redis_prefix: str
) -> None:
    """What the sidecar answers itself (GET /v1/models, /v1/models/{id}) is not rate limited: no
    in-flight slot, no request from the bucket, no x-ratelimit-* headers."""
    limits = rate_limit(backend, redis_url, redis_prefix, max_in_flight=1, requests_per_minute=600)
    with sidecar_with(mock, tmp_path, KEYS + limits) as sidecar, sdk(sidecar) as client:
        slow = in_flight_on(sidecar, mock)
        listing = client.models.with_raw_response.list()
        assert len(listing.parse().data) == 2
        assert not [name for name in listing.headers if name.startswith("x-ratelimit")]
        assert client.models.retrieve("second-model").id == "second-model"
        with pytest.raises(openai.RateLimitError):  # the slot is the slow request's
            client.chat.completions.create(model="demo-model", messages=HI)
        slow.join()
        for _ in range(3):
            client.models.list()
        raw = client.chat.completions.with_raw_response.create(model="demo-model", messages=HI)
    # The bucket of 600 gave one to the slow request, one to this; none to the listings (± refill).
    assert header(raw, "x-ratelimit-remaining-requests") in (598, 599)


def test_a_slot_freed_on_one_sidecar_is_free_on_the_other_at_once(
    mock: MockProcess, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """Two sidecars on one Redis, max_in_flight 1: a client sending one request at a time to either
    is never refused, and the limit still holds across the two."""
    limits = rate_limit("redis", redis_url, redis_prefix, max_in_flight=1, requests_per_minute=6000)
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with (
        sidecar_with(mock, tmp_path / "one", KEYS + limits) as one,
        sidecar_with(mock, tmp_path / "two", KEYS + limits) as two,
        sdk(one) as first,
        sdk(two) as second,
    ):
        for _ in range(4):
            for client, model in ((first, "demo-model"), (second, "demo-model"), (second, "second-model")):
                assert client.chat.completions.create(model=model, messages=HI).choices
        slow = in_flight_on(one, mock)
        with pytest.raises(openai.RateLimitError) as info:
            second.chat.completions.create(model="second-model", messages=HI)
        assert "in progress" in info.value.message
        slow.join()
        assert second.chat.completions.create(model="second-model", messages=HI).choices
