"""The Redis backend's allowances (redis_backend.py): requests and tokens taken ahead from a real
Redis, admitted locally, given back when idle; near its limit a bucket hands nothing out ahead.
The script gets the fake clock's time, so the bucket's refill is exact."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from middleware.rate_limit.backend import Ask, Ticket
from middleware.rate_limit.bucket import LimitSpec, Rate
from middleware.rate_limit.config import RateLimitConfig, RedisConfig
from middleware.rate_limit.redis_backend import RedisBackend
from proxy.clock import FakeClock

# 1000 requests and 100k tokens in the bucket, refilled at 1 request and 100 tokens a second.
ROOMY = LimitSpec(requests=Rate(60, 1000.0), tokens=Rate(6000, 100_000.0), max_in_flight=0)


def ask(tokens: int, spec: LimitSpec = ROOMY) -> Ask:
    return Ask(scope="acme", model="demo-model", key_id="k1", spec=spec, tokens=tokens)


class Counted:
    """A backend whose Redis calls are counted."""

    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend
        self.calls = 0
        call = backend.batcher.call

        def counting(*args: Any, **kwargs: Any) -> None:
            self.calls += 1
            call(*args, **kwargs)

        backend.batcher.call = counting  # type: ignore[method-assign]

    async def admit(self, claim: Ask) -> Ticket:
        ticket = await self.backend.acquire(claim)
        assert ticket.decision is not None and ticket.decision.allowed, ticket.decision
        return ticket


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_700_000_000.0)


def backend_for(url: str, prefix: str, clock: FakeClock, lease_ms: float = 100.0) -> RedisBackend:
    redis_config = RedisConfig(url=url, key_prefix=prefix, timeout_ms=1000, lease_ms=lease_ms)
    return RedisBackend(RateLimitConfig(backend="redis", redis=redis_config), clock, now=clock.now)


@pytest.fixture
async def counted(clock: FakeClock, redis_url: str, redis_prefix: str) -> AsyncIterator[Counted]:
    backend = backend_for(redis_url, redis_prefix, clock)
    yield Counted(backend)
    await backend.aclose()


def bucket(sync_redis: redis.Redis, prefix: str) -> tuple[float, float]:
    r, t = sync_redis.hmget(f"{prefix}{{acme}}:demo-model", "r", "t")
    assert r is not None and t is not None
    return float(r), float(t)


async def idle_flush(backend: RedisBackend, clock: FakeClock) -> None:
    """Let lease_ms pass without requests, and the give-back reach Redis."""
    clock.advance(0.2)
    await asyncio.sleep(0.15)  # the flush timer runs every lease_ms of the loop's own time
    await backend.batcher.drain()


async def test_far_from_its_limit_a_bucket_is_asked_a_few_times_not_per_request(counted: Counted) -> None:
    big = LimitSpec(requests=Rate(60, 100_000.0), tokens=Rate(6000, 10_000_000.0), max_in_flight=0)
    for _ in range(1000):
        await counted.admit(ask(10, big))
    # Each call takes ahead what was admitted since the last one: the calls grow the allowance
    # geometrically (the fake clock stands still, so no lease_ms scaling), then it is topped up.
    assert counted.calls <= 25, counted.calls


async def test_without_lease_ms_every_request_asks_redis(
    clock: FakeClock, redis_url: str, redis_prefix: str
) -> None:
    backend = backend_for(redis_url, redis_prefix, clock, lease_ms=0)
    counted = Counted(backend)
    try:
        for _ in range(50):
            await counted.admit(ask(10))
        assert counted.calls == 50
    finally:
        await backend.aclose()


async def test_what_an_allowance_holds_goes_back_when_idle(
    counted: Counted, clock: FakeClock, sync_redis: redis.Redis, redis_prefix: str
) -> None:
    tickets = [await counted.admit(ask(10)) for _ in range(300)]
    for ticket in tickets:
        counted.backend.release(ticket, 10)  # used what it reserved
    r, t = bucket(sync_redis, redis_prefix)
    assert r < 1000 - 300 and t < 100_000 - 3000  # more was taken ahead than admitted
    await idle_flush(counted.backend, clock)
    r, t = bucket(sync_redis, redis_prefix)
    # Exactly what was used is gone, plus 0.2 s of refill.
    assert r == pytest.approx(1000 - 300 + 0.2 * 1)
    assert t == pytest.approx(100_000 - 3000 + 0.2 * 100)
    assert counted.backend._allowances == {}  # forgotten once idle with nothing in flight


async def test_near_its_limit_a_bucket_hands_out_nothing_ahead(
    counted: Counted, clock: FakeClock, sync_redis: redis.Redis, redis_prefix: str
) -> None:
    small = dataclasses.replace(ROOMY, requests=Rate(60, 8.0))  # 8 requests, an eighth of 7 is 0
    for _ in range(8):
        await counted.admit(ask(1, small))
    assert counted.calls == 8  # each admission asked Redis: nothing was held locally
    refused = await counted.backend.acquire(ask(1, small))
    assert refused.decision is not None and not refused.decision.allowed
    assert refused.decision.reason == "requests"


async def test_a_settlements_charge_reaches_redis_while_requests_go_on(
    counted: Counted, clock: FakeClock, sync_redis: redis.Redis, redis_prefix: str
) -> None:
    ticket = await counted.admit(ask(10))
    counted.backend.release(ticket, 5010)  # used 5000 more than it reserved: a debt
    clock.advance(0.01)  # still active (not idle): only the debt goes
    await asyncio.sleep(0.15)
    await counted.backend.batcher.drain()
    _, t = bucket(sync_redis, redis_prefix)
    assert t == pytest.approx(100_000 - 5010 + 0.01 * 100)


async def test_far_from_the_in_flight_limit_a_freed_slot_is_reused_then_given_back(
    counted: Counted, clock: FakeClock, sync_redis: redis.Redis, redis_prefix: str
) -> None:
    capped = LimitSpec(requests=None, tokens=None, max_in_flight=32)
    slots = f"{redis_prefix}{{acme}}:inflight:k1"
    first = await counted.admit(ask(0, capped))
    assert counted.calls == 1 and sync_redis.zcard(slots) == 1
    counted.backend.release(first, 0)  # 1 of 32 registered: kept for the key's next request here
    other_model = dataclasses.replace(ask(0, capped), model="other-model")
    second = await counted.admit(other_model)
    assert counted.calls == 1  # the freed slot, reused (by another model of the key): no call
    third = await counted.admit(ask(0, capped))  # none free here: Redis registers another
    assert counted.calls == 2 and sync_redis.zcard(slots) == 2
    counted.backend.release(second, 0)
    counted.backend.release(third, 0)
    await idle_flush(counted.backend, clock)
    assert sync_redis.zcard(slots) == 0
    assert counted.backend._allowances == {} and counted.backend._slots == {}  # idle: forgotten


async def test_near_the_in_flight_limit_a_freed_slot_is_freed_in_redis_at_once(
    counted: Counted, sync_redis: redis.Redis, redis_prefix: str
) -> None:
    """Kept, it would count against the key on its other sidecars: up to a limit of 8 none is."""
    capped = LimitSpec(requests=None, tokens=None, max_in_flight=8)
    slots = f"{redis_prefix}{{acme}}:inflight:k1"
    first = await counted.admit(ask(0, capped))
    counted.backend.release(first, 0)
    assert counted.calls == 2  # the release freed it in a call of its own, sent at once
    await counted.backend.batcher.drain()
    assert sync_redis.zcard(slots) == 0
    second = await counted.admit(ask(0, capped))
    third = await counted.admit(ask(0, capped))
    assert counted.calls == 4 and sync_redis.zcard(slots) == 2
    other_key = await counted.admit(dataclasses.replace(ask(0, capped), key_id="k2"))
    for ticket in (second, third, other_key):
        counted.backend.release(ticket, 0)
    await counted.backend.batcher.drain()
    assert sync_redis.zcard(slots) == 0


async def test_two_sidecars_share_one_bucket_exactly(
    clock: FakeClock, redis_url: str, redis_prefix: str
) -> None:
    """Whatever either holds ahead, together they admit exactly what the bucket had."""
    spec = dataclasses.replace(ROOMY, requests=Rate(60, 200.0), tokens=None)
    one, two = (backend_for(redis_url, redis_prefix, clock) for _ in range(2))
    try:
        admitted = 0
        for _ in range(400):
            for backend in (one, two):
                ticket = await backend.acquire(ask(0, spec))
                assert ticket.decision is not None
                admitted += ticket.decision.allowed
        assert admitted == 200
    finally:
        await one.aclose()
        await two.aclose()


async def test_a_busy_sidecar_gives_back_the_slots_it_no_longer_reuses(
    counted: Counted, clock: FakeClock, sync_redis: redis.Redis, redis_prefix: str
) -> None:
    """After a peak, the slots a sidecar keeps for reuse shrink to what it still uses: the rest go
    back after lease_ms unused, for the key's other sidecars."""
    capped = LimitSpec(requests=None, tokens=None, max_in_flight=64)  # far: up to 7 kept
    slots = f"{redis_prefix}{{acme}}:inflight:k1"
    peak = [await counted.admit(ask(0, capped)) for _ in range(2)]
    for ticket in peak:
        counted.backend.release(ticket, 0)
    assert sync_redis.zcard(slots) == 2
    clock.advance(0.05)
    counted.backend.release(await counted.admit(ask(0, capped)), 0)  # one slot still in use
    clock.advance(0.07)  # the other unused for 120 ms; the allowance itself used 70 ms ago
    await asyncio.sleep(0.15)
    await counted.backend.batcher.drain()
    assert sync_redis.zcard(slots) == 1
    assert len(counted.backend._allowances) == 1  # still active: kept
