"""Issue 6's scenarios under injected faults: the real sidecar with ``retry`` + ``circuit_breaker``,
two replicas (two upstreams, each behind its own TCP fault proxy, both in front of one mock backend
so that the mock's answer count by request id covers both), the async openai SDK with
``max_retries=0`` as the client.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.fault_proxy import FaultProxy
from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess
from tests.integration.test_resilience import two_replicas

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
# Each attempt fails with a chance of about 10 % (5 % resets, 5 % 503s): with 3 attempts about one
# request in a thousand would still fail, so the scenario's "0 failed" takes 5 (the budget still caps
# the extra attempts at 20 % of the requests).
MIDDLEWARE = "  - {type: retry, attempts: 5}\n  - {type: circuit_breaker, open_s: 1}\n"


@pytest.fixture
def mock() -> Iterator[MockProcess]:
    with MockProcess() as proc:
        yield proc


@pytest.fixture
def replicas(mock: MockProcess) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    with FaultProxy(("127.0.0.1", mock.port)) as a, FaultProxy(("127.0.0.1", mock.port)) as b:
        yield a, b


async def one_request(client: AsyncOpenAI, stream: bool) -> None:
    if not stream:
        reply = await client.chat.completions.create(model="demo-model", messages=HI)
        assert reply.choices[0].message.content
        return
    chunks = await client.chat.completions.create(model="demo-model", messages=HI, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in chunks if c.choices])
    assert text  # iterated to the end: a cut stream would have raised


async def run_load(base_url: str, total: int, concurrency: int) -> list[BaseException | None]:
    """``total`` requests, every third a stream, ``concurrency`` at a time; each one's error or None."""
    outcomes: list[BaseException | None] = []
    queue = iter(range(total))
    async with AsyncOpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=30) as client:

        async def worker() -> None:
            for i in queue:
                try:
                    await one_request(client, stream=i % 3 == 0)
                    outcomes.append(None)
                except Exception as e:
                    outcomes.append(e)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes


def test_2000_requests_through_resets_and_503s_all_succeed_once_within_the_budget(
    mock: MockProcess, replicas: tuple[FaultProxy, FaultProxy], tmp_path: Path
) -> None:
    a, b = replicas
    a.set(reset_ratio=0.05, seed=1)  # 5 % of the requests sent upstream: the connection is reset
    b.set(reset_ratio=0.05, seed=2)
    mock.set_faults(status_ratio={"status": 503, "ratio": 0.05}, seed=3)  # and 5 % answered 503
    total = 2000
    with SidecarProcess(two_replicas(a.url, b.url, MIDDLEWARE), tmp_path) as sidecar:
        started = time.monotonic()
        outcomes = asyncio.run(run_load(sidecar.base_url, total, concurrency=16))
        elapsed = time.monotonic() - started
    failed = [e for e in outcomes if e is not None]
    assert len(outcomes) == total and not failed, failed[:3]
    stats = mock.stats()
    assert stats["answered"] == total and stats["answered_twice"] == 0  # each answered exactly once
    sa, sb = a.stats(), b.stats()
    resets, refused = sa["resets"] + sb["resets"], stats["requests"] - stats["answered"]
    assert resets > 0.02 * total and refused > 0.02 * total  # the faults did happen
    extra = sa["requests"] + sb["requests"] - total  # upstream attempts beyond one per request
    windows = math.ceil(elapsed / 10) + 1  # the budget's floor is 10 retries per 10 s window
    assert extra <= 0.2 * total + 10 * windows, (extra, elapsed)


def test_a_killed_replica_is_opened_and_traffic_flows_back_after_recovery(
    mock: MockProcess, replicas: tuple[FaultProxy, FaultProxy], tmp_path: Path
) -> None:
    a, b = replicas
    with SidecarProcess(two_replicas(a.url, b.url, MIDDLEWARE), tmp_path) as sidecar:
        errors: list[BaseException] = []
        done = threading.Event()

        def load() -> None:
            with OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0) as client:
                while not done.is_set():
                    try:
                        client.chat.completions.create(model="demo-model", messages=HI)
                    except openai.APIError as e:
                        errors.append(e)
                    time.sleep(0.005)

        thread = threading.Thread(target=load)
        thread.start()
        try:
            time.sleep(0.5)
            assert a.stats()["forwarded"] > 0 and b.stats()["forwarded"] > 0  # both serve
            killed_at = time.monotonic()
            a.set(mode="reset")  # replica a dies: every connection and request is reset
            last_seen, seen = killed_at, a.stats()["requests"] + a.stats()["connections"]
            while time.monotonic() - killed_at < 0.9:  # open_s is 1: watch a while it is open
                now_seen = a.stats()["requests"] + a.stats()["connections"]
                if now_seen != seen:
                    seen, last_seen = now_seen, time.monotonic()
                time.sleep(0.01)
            assert last_seen - killed_at < 0.5, "a was still tried after its breaker should have opened"
            a.set(mode="pass")  # back: after open_s, half-open probes succeed and close it
            before = a.stats()["forwarded"]
            deadline = time.monotonic() + 5
            while a.stats()["forwarded"] < before + 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert a.stats()["forwarded"] >= before + 20, "traffic did not flow back to a"
        finally:
            done.set()
            thread.join()
        logs = sidecar.logs()
    assert not errors, errors[:3]  # retries hid the failure from every client
    assert "circuit breaker of upstream a opened" in logs
