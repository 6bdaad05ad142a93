"""Many sidecars, one Redis: the fleet enforces one limit as if it were one sidecar; and a Redis that
hangs or dies never hangs a request, and is used again as soon as it is back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config
from tests.redis_proc import RedisServer

# "abcd" is a prompt the sidecar's estimate and the mock's count agree on (2 tokens), so a request
# with max_tokens M reserves exactly what it uses: 2 + M.
EXACT = {"role": "user", "content": "abcd"}


def fleet_config(mock: MockProcess, redis_url: str, prefix: str, limits: str, redis_extra: str = "") -> str:
    return minimal_config(
        mock.url,
        extra=(
            "middleware:\n"
            "  - type: auth\n"
            "    keys:\n"
            "      - {id: k-req, key: sk-req, limits: {requests_per_minute: 1200}}\n"
            "      - {id: k-tok, key: sk-tok, limits: {tokens_per_minute: 30000}}\n"
            "      - {id: k-any, key: sk-any}\n"
            "  - type: rate_limit\n"
            "    backend: redis\n"
            f'    redis: {{url: "{redis_url}", key_prefix: "{prefix}"{redis_extra}}}\n'
            f"{limits}"
        ),
    )


@contextlib.contextmanager
def sidecars(config: str, tmp_path: Path, count: int) -> Iterator[list[SidecarProcess]]:
    with contextlib.ExitStack() as stack:
        dirs = [tmp_path / f"sidecar{i}" for i in range(count)]
        for d in dirs:
            d.mkdir()
        procs = [stack.enter_context(SidecarProcess(config, d)) for d in dirs]
        yield procs


@dataclass
class Tally:
    admitted: int = 0
    refused: int = 0
    other: list[int] = field(default_factory=list)
    tokens: int = 0  # usage.total_tokens of the admitted
    slowest: float = 0.0
    first_sent: float = 0.0
    last_done: float = 0.0


async def hammer(urls: list[str], key: str, seconds: float, workers: int, body: dict[str, object]) -> Tally:
    """``workers`` concurrent clients per sidecar, each sending back to back for ``seconds``."""
    tally = Tally(first_sent=time.monotonic())
    deadline = tally.first_sent + seconds
    headers = {"authorization": f"Bearer {key}"}

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            start = time.monotonic()
            response = await client.post("/v1/chat/completions", json=body, headers=headers)
            done = time.monotonic()
            tally.slowest = max(tally.slowest, done - start)
            tally.last_done = max(tally.last_done, done)
            if response.status_code == 200:
                tally.admitted += 1
                tally.tokens += response.json()["usage"]["total_tokens"]
            elif response.status_code == 429:
                tally.refused += 1
            else:
                tally.other.append(response.status_code)

    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    clients = [httpx.AsyncClient(base_url=url, limits=limits, timeout=10) for url in urls]
    try:
        await asyncio.gather(*(worker(c) for c in clients for _ in range(workers)))
    finally:
        for c in clients:
            await c.aclose()
    return tally


def bucket(client: redis.Redis, key: str) -> tuple[float, float, float]:
    """(requests, tokens, last update) of a bucket, as the Lua script keeps it (lua.py)."""
    values = client.hmget(key, "r", "t", "u")
    assert all(v is not None for v in values), f"no bucket {key}"
    r, t, u = (float(v) for v in values)  # type: ignore[arg-type]
    return r, t, u


async def warm_up(url: str, key: str, count: int, body: dict[str, object]) -> None:
    """Take ``count`` from the bucket at once, so it starts the test well below its size (a full
    bucket would drop refill while the test gets going, and the books would not balance)."""
    headers = {"authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        replies = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=body, headers=headers) for _ in range(count))
        )
    assert [r.status_code for r in replies] == [200] * count


def redis_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1e6


# Longer than lease_ms (100 ms): what the sidecars took ahead from a bucket is back in it by then.
GIVE_BACK_S = 0.4


def test_four_sidecars_admit_the_exact_budget_of_one(
    mock: MockProcess, tmp_path: Path, redis_url: str, redis_prefix: str
) -> None:
    """The budget of a window [u0, u1] (on Redis' own clock, read from the bucket before and after)
    is what the bucket held at u0 plus the refill until u1. What the fleet admitted in the window
    plus what the bucket holds at u1 must equal it exactly (no update lost or doubled across the
    four sidecars; both readings are taken once the sidecars have given back what they took ahead),
    and when the hammering ended (Redis time u_end) the fleet had used all but 1 % of the budget
    until then (what it had taken ahead included)."""
    # Buckets of 0.1 minute's worth: requests 120 then 20/s; tokens 3000 then 500/s.
    config = fleet_config(mock, redis_url, redis_prefix, "    burst: 0.1\n", redis_extra=", timeout_ms: 2000")
    store = redis.Redis.from_url(redis_url)
    phases = {"k-req": (8, 60), "k-tok": (18, 75)}  # max_tokens (k-tok: 2 + 18 = 20 tokens), warm-up
    results = {}
    with sidecars(config, tmp_path, 4) as fleet:
        urls = [s.url for s in fleet]
        for key, (max_tokens, taken) in phases.items():
            body = {"model": "demo-model", "messages": [EXACT], "max_tokens": max_tokens}
            api_key = "sk-" + key.removeprefix("k-")
            asyncio.run(warm_up(urls[0], api_key, taken, body))
            time.sleep(GIVE_BACK_S)
            before = bucket(store, f"{redis_prefix}{{{key}}}:demo-model")
            tally = asyncio.run(hammer(urls, api_key, 2.5, 12, body))
            end = redis_time(store)
            time.sleep(GIVE_BACK_S)
            after = bucket(store, f"{redis_prefix}{{{key}}}:demo-model")
            results[key] = (before, tally, end, after)
        logs = "".join(s.logs() for s in fleet)
    store.close()

    assert "Redis at" not in logs, logs  # every call answered in time: no request went unchecked
    (r0, _, u0), by_requests, end, (r1, _, u1) = results["k-req"]
    assert by_requests.other == [] and by_requests.refused > 0
    budget = r0 + 20 * (u1 - u0)
    assert by_requests.admitted == pytest.approx(budget - r1, abs=1e-3), (by_requests, budget, r1)
    until_end = r0 + 20 * (end - u0)
    assert until_end - by_requests.admitted < 0.01 * until_end, (by_requests, until_end)

    (_, t0, u0), by_tokens, end, (_, t1, u1) = results["k-tok"]
    assert by_tokens.other == [] and by_tokens.refused > 0
    assert by_tokens.tokens == 20 * by_tokens.admitted  # each used exactly what it reserved
    budget = t0 + 500 * (u1 - u0)
    assert by_tokens.tokens == pytest.approx(budget - t1, abs=1e-3), (by_tokens, budget, t1)
    until_end = t0 + 500 * (end - u0)
    assert until_end - by_tokens.tokens < 0.01 * until_end, (by_tokens, until_end)


def test_a_hung_then_dead_redis_never_hangs_requests_and_is_used_again_when_back(
    mock: MockProcess, tmp_path: Path, private_redis: RedisServer
) -> None:
    limits = "    requests_per_minute: 600\n    burst: 0.05\n"  # 30 in the bucket, then 10/s
    redis_extra = ", timeout_ms: 50, breaker_failures: 3, breaker_open_s: 0.5"
    allow = fleet_config(
        mock, private_redis.url, "allow:", limits + "    on_redis_error: allow\n", redis_extra
    )
    deny = fleet_config(mock, private_redis.url, "deny:", limits + "    on_redis_error: deny\n", redis_extra)
    body = {"model": "demo-model", "messages": [EXACT], "max_tokens": 1}
    (tmp_path / "allow").mkdir()
    (tmp_path / "deny").mkdir()
    with (
        SidecarProcess(allow, tmp_path / "allow") as allowing,
        SidecarProcess(deny, tmp_path / "deny") as denying,
    ):

        def run(sidecar: SidecarProcess, seconds: float) -> Tally:
            return asyncio.run(hammer([sidecar.url], "sk-any", seconds, 4, body))

        healthy = run(allowing, 1.0)
        assert healthy.admitted <= 30 + 10 * 1.2 and healthy.refused > 0  # enforced

        assert private_redis.proc is not None
        os.kill(private_redis.proc.pid, signal.SIGSTOP)  # hung: connections open, no answers
        try:
            hung = run(allowing, 1.0)
            hung_deny = run(denying, 1.0)
        finally:
            os.kill(private_redis.proc.pid, signal.SIGCONT)
        assert hung.refused == 0 and hung.other == [] and hung.admitted > 30  # allowed, unchecked
        assert hung.slowest < 0.5, hung  # at most a deadline (50 ms) or so, then the breaker skips Redis
        assert set(hung_deny.other) == {503} and hung_deny.admitted == 0 and hung_deny.slowest < 0.5

        private_redis.stop()  # dead: connections refused
        dead = run(allowing, 1.0)
        assert dead.refused == 0 and dead.other == [] and dead.slowest < 0.5

        private_redis.start()  # back, empty: a fresh bucket of 30
        back = time.monotonic()
        enforced_after = None
        while time.monotonic() - back < 5:
            tally = run(allowing, 0.5)
            if tally.refused:
                enforced_after = time.monotonic() - back
                break
        assert enforced_after is not None and enforced_after < 3, (
            "limits not enforced again after Redis came back"
        )
        back = time.monotonic()
        while run(denying, 0.3).other and time.monotonic() - back < 3:
            pass
        assert run(denying, 0.3).other == []  # and deny mode lets requests through again
        allowing.wait_log("answers again; limits are enforced")
