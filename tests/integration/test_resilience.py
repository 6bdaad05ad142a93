"""Resilience end to end: the real sidecar with ``retry`` and ``circuit_breaker`` in front of two
mock backends (two replicas of one route), the official openai SDK with ``max_retries=0``.

Faults come from the mock's own switches (status bursts, Retry-After, slow first byte, resets and
stalls mid-stream) and from a dead port; tests/integration/test_fault_scenario.py adds the TCP fault
proxy and the 2000-request run.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def two_replicas(url_a: str, url_b: str, middleware: str, upstream_extra: str = "") -> str:
    return (
        'listen: {address: "127.0.0.1:0"}\n'
        "upstreams:\n"
        f'  a: {{url: "{url_a}"{upstream_extra}}}\n'
        f'  b: {{url: "{url_b}"{upstream_extra}}}\n'
        "routes:\n"
        "  - model: demo-model\n"
        "    targets:\n"
        "      - {upstream: a, model: mock-model-v1, weight: 50}\n"
        "      - {upstream: b, model: mock-model-v1, weight: 50}\n"
        f"middleware:\n{middleware}"
    )


RESILIENT = (
    "  - {type: retry, attempts: 3}\n"
    "  - {type: circuit_breaker, consecutive_failures: 5, open_s: 1, half_open_probes: 2}\n"
)


@pytest.fixture(scope="module")
def mock_a() -> Iterator[MockProcess]:
    with MockProcess() as proc:
        yield proc


@pytest.fixture(scope="module")
def mock_b() -> Iterator[MockProcess]:
    with MockProcess() as proc:
        yield proc


@pytest.fixture(autouse=True)
def _fresh_mocks(mock_a: MockProcess, mock_b: MockProcess) -> None:
    mock_a.reset()
    mock_b.reset()


@pytest.fixture
def sidecar(mock_a: MockProcess, mock_b: MockProcess, tmp_path: Path) -> Iterator[SidecarProcess]:
    with SidecarProcess(two_replicas(mock_a.url, mock_b.url, RESILIENT), tmp_path) as proc:
        yield proc


def sdk(sidecar: SidecarProcess, **kwargs: Any) -> OpenAI:
    return OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0, **kwargs)


def chat(client: OpenAI, **headers: str) -> Any:
    return client.chat.completions.with_raw_response.create(
        model="demo-model", messages=HI, extra_headers=headers
    )


def dead_url() -> str:
    """A port nothing listens on (connect is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ---- retry -----------------------------------------------------------------------------------------


def test_503s_are_retried_on_the_other_replica_and_the_client_gets_the_answer(
    sidecar: SidecarProcess, mock_a: MockProcess, mock_b: MockProcess
) -> None:
    mock_a.set_faults(status_burst={"status": 503, "count": 1})
    mock_b.set_faults(status_burst={"status": 503, "count": 1})
    with sdk(sidecar) as client:
        raw = chat(client)
    assert raw.http_response.status_code == 200
    assert raw.headers["x-retry-attempts"] == "2"
    ids_a, ids_b = mock_a.stats()["request_ids"], mock_b.stats()["request_ids"]
    assert ids_a and ids_b  # the first retry went to the other replica, not the same one again
    assert len(ids_a + ids_b) == 3 and len(set(ids_a + ids_b)) == 1  # one request, sent three times


def test_an_upstream_retry_after_is_waited_for(
    sidecar: SidecarProcess, mock_a: MockProcess, mock_b: MockProcess
) -> None:
    for mock in (mock_a, mock_b):
        mock.set_faults(status_burst={"status": 429, "count": 1, "retry_after": 0.4})
    with sdk(sidecar) as client:
        started = time.monotonic()
        raw = chat(client)
        waited = time.monotonic() - started
    assert raw.http_response.status_code == 200 and raw.headers["x-retry-attempts"] == "2"
    assert waited >= 0.8  # each replica's retry-after-ms: 400 honoured


def test_a_retry_after_beyond_the_deadline_returns_the_429_at_once(
    mock_a: MockProcess, mock_b: MockProcess, tmp_path: Path
) -> None:
    middleware = "  - {type: retry, deadline_s: 5}\n  - {type: circuit_breaker}\n"
    for mock in (mock_a, mock_b):
        mock.set_faults(status_burst={"status": 429, "count": 1, "retry_after": 60})
    with (
        SidecarProcess(two_replicas(mock_a.url, mock_b.url, middleware), tmp_path) as sidecar,
        sdk(sidecar) as client,
        pytest.raises(openai.RateLimitError) as info,
    ):
        chat(client)
    headers = info.value.response.headers
    assert headers["retry-after"] == "60" and headers["retry-after-ms"] == "60000"
    assert headers["x-retry-attempts"] == "0"
    assert mock_a.stats()["requests"] + mock_b.stats()["requests"] == 1


def test_a_first_byte_timeout_is_not_retried(
    mock_a: MockProcess, mock_b: MockProcess, tmp_path: Path
) -> None:
    config = two_replicas(mock_a.url, mock_b.url, RESILIENT, upstream_extra=", first_byte_timeout_s: 0.3")
    with (
        SidecarProcess(config, tmp_path) as sidecar,
        sdk(sidecar) as client,
        pytest.raises(openai.APIStatusError) as info,
    ):
        chat(client, **{"x-mock-first-byte-ms": "1000"})
    assert info.value.status_code == 504 and info.value.response.headers["x-retry-attempts"] == "0"
    assert mock_a.stats()["requests"] + mock_b.stats()["requests"] == 1  # it may be generating: not resent


# ---- circuit breaker: a dead replica, a slow one, recovery -----------------------------------------


def test_a_dead_replica_is_failed_over_and_its_breaker_opens(mock_b: MockProcess, tmp_path: Path) -> None:
    with (
        SidecarProcess(two_replicas(dead_url(), mock_b.url, RESILIENT), tmp_path) as sidecar,
        sdk(sidecar) as client,
    ):
        attempts = [int(chat(client).headers["x-retry-attempts"]) for _ in range(40)]
        logs = sidecar.logs()
    assert mock_b.stats()["completed"] == 40  # every request answered, by the live replica
    assert sum(attempts) == 5  # five connect failures opened a's breaker; then a was not tried
    assert logs.count("circuit breaker of upstream a opened") == 1


def test_a_slow_replica_is_opened_by_the_slow_call_rule(
    mock_a: MockProcess, mock_b: MockProcess, tmp_path: Path
) -> None:
    middleware = "  - {type: circuit_breaker, slow_call_s: 1.5, slow_calls: 5, open_s: 30}\n"
    mock_a.set_faults(first_byte_ms=1600)  # every answer of a: the first byte after 1.6 s
    with (
        SidecarProcess(two_replicas(mock_a.url, mock_b.url, middleware), tmp_path) as sidecar,
        sdk(sidecar) as client,
    ):

        def stream() -> str:
            chunks = client.chat.completions.create(model="demo-model", messages=HI, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        while mock_a.stats()["completed"] < 5:
            assert stream()
        for _ in range(20):
            assert stream()
        logs = sidecar.logs()
    assert mock_a.stats()["requests"] == 5  # five slow streams, then nothing more went to a
    assert "circuit breaker of upstream a opened for 30 s (slow calls)" in logs


def test_traffic_flows_back_after_recovery_through_half_open(
    mock_a: MockProcess, mock_b: MockProcess, sidecar: SidecarProcess
) -> None:
    mock_a.set_faults(status_burst={"status": 503, "count": 5})
    with sdk(sidecar) as client:
        while mock_a.stats()["requests"] < 5:
            assert chat(client).http_response.status_code == 200  # retried on b
        opened_at = time.monotonic()
        while time.monotonic() - opened_at < 0.8:  # open_s 1: a gets nothing
            chat(client)
        assert mock_a.stats()["requests"] == 5
        time.sleep(0.3)
        for _ in range(40):
            assert chat(client).http_response.status_code == 200
    stats = mock_a.stats()
    assert stats["completed"] >= 5  # probes succeeded, the breaker closed, a is used again (~half of 40)


def test_with_every_breaker_open_the_client_gets_503_with_retry_after(tmp_path: Path) -> None:
    middleware = "  - {type: circuit_breaker, consecutive_failures: 2, open_s: 30}\n"
    with (
        SidecarProcess(two_replicas(dead_url(), dead_url(), middleware), tmp_path) as sidecar,
        sdk(sidecar) as client,
    ):
        codes = []
        for _ in range(6):
            with pytest.raises(openai.APIStatusError) as info:
                chat(client)
            codes.append(info.value.status_code)
    assert codes[:4] == [502] * 4 and codes[4:] == [503, 503]
    headers = info.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 30
    body = info.value.body
    assert isinstance(body, dict) and body["code"] == "upstream_unavailable"


# ---- streams: errors after the head, total timeout ---------------------------------------------------


@pytest.mark.parametrize("over", ["http1", "h2c"])
def test_a_stream_reset_mid_way_ends_with_an_error_event_the_sdk_raises(
    sidecar: SidecarProcess, mock_a: MockProcess, mock_b: MockProcess, over: str
) -> None:
    http = httpx.Client(http1=over == "http1", http2=over == "h2c", timeout=10)
    with sdk(sidecar, http_client=http) as client:
        stream = client.chat.completions.create(
            model="demo-model", messages=HI, stream=True, extra_headers={"x-mock-reset-after": "3"}
        )
        got = []
        with pytest.raises(openai.APIError) as info:
            for chunk in stream:
                got.append(chunk)
    assert len(got) == 3  # what came before the cut reached the client, then the error
    assert not isinstance(info.value, openai.APIConnectionError)
    assert isinstance(info.value.body, dict) and info.value.body["code"] == "upstream_connection_closed"
    # and nothing was sent again once bytes had gone out (retry sits in front of this sidecar)
    assert mock_a.stats()["requests"] + mock_b.stats()["requests"] == 1


@pytest.mark.parametrize("protocol", ["http1", "h2c"])
def test_total_timeout_cuts_a_slow_steady_stream_and_a_slow_answer(protocol: str, tmp_path: Path) -> None:
    extra = f", protocol: {protocol}, total_timeout_s: 0.6, read_timeout_s: 5"
    config = (
        'listen: {address: "127.0.0.1:0"}\n'
        "upstreams:\n"
        f'  mock: {{url: "%s"{extra}}}\n'
        "routes:\n"
        "  - model: demo-model\n"
        "    targets: [{upstream: mock, model: m}]\n"
    )
    with MockProcess(args=["--h2c"] if protocol == "h2c" else []) as mock:
        with SidecarProcess(config % mock.url, tmp_path) as sidecar, sdk(sidecar) as client:
            stream = client.chat.completions.create(
                model="demo-model",
                messages=HI,
                stream=True,
                extra_headers={"x-mock-chunks": "40", "x-mock-delay-ms": "50"},  # steady, 2 s in all
            )
            started = time.monotonic()
            with pytest.raises(openai.APIError) as info:
                for _chunk in stream:
                    pass
            assert time.monotonic() - started < 1.5
            assert isinstance(info.value.body, dict) and info.value.body["code"] == "upstream_timeout"
            with pytest.raises(openai.APIStatusError) as slow:
                chat(client, **{"x-mock-first-byte-ms": "2000"})
            assert slow.value.status_code == 504
        mock.wait_stats(lambda s: s["disconnects"] == 2)  # both upstream calls were closed


def test_when_the_route_cannot_serve_its_fallback_route_does(mock_b: MockProcess, tmp_path: Path) -> None:
    config = (
        'listen: {address: "127.0.0.1:0"}\n'
        "upstreams:\n"
        f'  dead: {{url: "{dead_url()}"}}\n'
        f'  live: {{url: "{mock_b.url}"}}\n'
        "routes:\n"
        "  - model: demo-model\n"
        "    targets: [{upstream: dead, model: big-model}]\n"
        "    fallbacks: [small]\n"
        "  - model: small\n"
        "    targets: [{upstream: live, model: small-model}]\n"
        f"middleware:\n{RESILIENT}"
    )
    with SidecarProcess(config, tmp_path) as sidecar, sdk(sidecar) as client:
        raw = chat(client)
    assert raw.http_response.status_code == 200 and raw.headers["x-retry-attempts"] == "1"
    sent = mock_b.stats()["last_request"]["json"]
    assert sent["model"] == "small-model"  # the fallback's target, with its own model name
