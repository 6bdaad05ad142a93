"""``circuit_breaker.shared``: two real sidecar processes sharing breaker opens through a real Redis
(the fixture's: REDIS_URL, 127.0.0.1:6379, or a private redis-server), in front of two replicas —
replica a behind a TCP fault proxy that can kill it and counts every attempt, replica b the mock."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.fault_proxy import FaultProxy
from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess
from tests.integration.test_resilience import dead_url, two_replicas

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def shared_middleware(redis_url: str, prefix: str) -> str:
    return (
        "  - {type: retry}\n"
        "  - type: circuit_breaker\n"
        "    consecutive_failures: 3\n"
        "    open_s: 30\n"
        f'    shared: {{url: "{redis_url}", key_prefix: "{prefix}", poll_s: 0.05}}\n'
    )


@pytest.fixture
def mock() -> Iterator[MockProcess]:
    with MockProcess() as proc:
        yield proc


def ask(sidecar: SidecarProcess, n: int) -> None:
    with OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0) as client:
        for _ in range(n):
            assert client.chat.completions.create(model="demo-model", messages=HI).choices


def attempts(proxy: FaultProxy) -> int:
    stats = proxy.stats()
    return stats["connections"] + stats["requests"]


def test_an_open_breaker_is_shared_by_the_fleet(
    mock: MockProcess, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    with FaultProxy(("127.0.0.1", mock.port)) as a:
        config = two_replicas(a.url, mock.url, shared_middleware(redis_url, redis_prefix))
        (tmp_path / "one").mkdir()
        (tmp_path / "two").mkdir()
        with SidecarProcess(config, tmp_path / "one") as one, SidecarProcess(config, tmp_path / "two") as two:
            ask(one, 4)
            ask(two, 4)  # both have used a (and started their sync with Redis)
            a.set(mode="reset")  # replica a dies
            deadline = time.monotonic() + 5
            while "circuit breaker of upstream a opened" not in one.logs():
                assert time.monotonic() < deadline, one.logs()
                ask(one, 1)  # retried on b: the client sees nothing
            time.sleep(0.5)  # ten of two's polls
            before = attempts(a)
            ask(two, 30)  # two never saw a fail, yet it keeps off a
            assert attempts(a) == before, "the second sidecar still sent requests to the dead replica"
            assert "circuit breaker of upstream a opened" not in two.logs()


def test_a_dead_redis_leaves_each_breaker_working_alone(mock: MockProcess, tmp_path: Path) -> None:
    config = two_replicas(dead_url(), mock.url, shared_middleware(dead_url().replace("http", "redis"), "t:"))
    with SidecarProcess(config, tmp_path) as sidecar:
        started = time.monotonic()
        ask(sidecar, 30)  # every request answered, none held up by Redis
        assert time.monotonic() - started < 10
        time.sleep(0.3)
        logs = sidecar.logs()
    assert logs.count("shared circuit breakers: Redis failed") == 1  # logged once, not per round
    assert "circuit breaker of upstream a opened" in logs  # the local breaker did its work
