"""The two rate-limit stores agree: the same scenarios against ``memory`` and ``redis`` (real Redis,
the Lua script fed the fake clock's time instead of Redis TIME); then what only Redis has: leases,
NOSCRIPT, deadlines, the breaker, recovery."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import pytest
import redis

from middleware.rate_limit.backend import Ask, Backend, Ticket
from middleware.rate_limit.bucket import Decision, LimitSpec, Rate
from middleware.rate_limit.config import RateLimitConfig, RedisConfig
from middleware.rate_limit.memory import MemoryBackend
from middleware.rate_limit.redis_backend import RedisBackend
from proxy.clock import FakeClock
from proxy.errors import RateLimiterUnavailable
from tests.redis_proc import RedisServer, free_port

SPEC = LimitSpec(requests=Rate(60, 3.0), tokens=Rate(600, 100.0), max_in_flight=0)


def ask(tokens: int, spec: LimitSpec = SPEC, key_id: str = "k1", model: str = "demo-model") -> Ask:
    return Ask(scope="acme", model=model, key_id=key_id, spec=spec, tokens=tokens)


def redis_config(url: str, prefix: str, **redis_options: float) -> RateLimitConfig:
    return RateLimitConfig(backend="redis", redis=RedisConfig(url=url, key_prefix=prefix, **redis_options))  # type: ignore[arg-type]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(start=1_700_000_000.0)


@pytest.fixture(params=["memory", "redis"])
async def store(
    request: pytest.FixtureRequest, clock: FakeClock, redis_url: str, redis_prefix: str
) -> AsyncIterator[Backend]:
    backend: Backend
    if request.param == "memory":
        backend = MemoryBackend(clock, max_buckets=100)
    else:
        backend = RedisBackend(redis_config(redis_url, redis_prefix, timeout_ms=1000), clock, now=clock.now)
    yield backend
    await backend.aclose()


async def admit(store: Backend, claim: Ask) -> tuple[Ticket, Decision]:
    ticket = await store.acquire(claim)
    assert ticket.decision is not None
    return ticket, ticket.decision


async def settled(store: Backend) -> None:
    """Let a background settlement reach Redis (memory settles at once)."""
    if isinstance(store, RedisBackend):
        await store.batcher.drain()


# -- the same answers from both stores --------------------------------------------------------------


async def test_burst_refusal_and_refill(store: Backend, clock: FakeClock) -> None:
    remaining = [(await admit(store, ask(10)))[1].requests_remaining for _ in range(3)]
    assert remaining == [2, 1, 0]
    _, refused = await admit(store, ask(10))
    assert (refused.allowed, refused.reason, refused.tokens_remaining) == (False, "requests", 70)
    assert refused.retry_after_s == pytest.approx(1.0, abs=0.001)
    assert refused.requests_reset_s == pytest.approx(3.0, abs=0.001)
    clock.advance(1.0)
    _, again = await admit(store, ask(10))
    assert (again.allowed, again.requests_remaining, again.tokens_remaining) == (True, 0, 70)


async def test_reserve_then_settle_refunds_and_charges(store: Backend, clock: FakeClock) -> None:
    ticket, first = await admit(store, ask(90))
    assert first.tokens_remaining == 10
    store.release(ticket, 25)  # used 25 of 90
    await settled(store)
    ticket, second = await admit(store, ask(10))
    assert second.tokens_remaining == 65  # 100 - 25 - 10
    store.release(ticket, 150)  # used 150 with 10 reserved: 75 below zero
    await settled(store)
    _, refused = await admit(store, ask(5))
    assert (refused.reason, refused.tokens_remaining) == ("tokens", 0)
    assert refused.retry_after_s == pytest.approx(8.0, abs=0.001)  # 80 tokens at 10/s
    clock.advance(8.0)
    assert (await admit(store, ask(5)))[1].allowed


async def test_in_flight_cap_per_key(store: Backend) -> None:
    capped = dataclasses.replace(SPEC, requests=None, tokens=None, max_in_flight=2)
    t1, d1 = await admit(store, ask(0, capped))
    _, d2 = await admit(store, ask(0, capped))
    _, d3 = await admit(store, ask(0, capped))
    assert [d1.allowed, d2.allowed, d3.allowed] == [True, True, False]
    assert d3.reason == "in_flight" and d3.retry_after_s == 1.0
    assert (await admit(store, ask(0, capped, key_id="k2")))[1].allowed  # another key: its own slots
    store.release(t1, 0)
    await settled(store)
    assert (await admit(store, ask(0, capped)))[1].allowed


# Roomy request and token buckets (so the Redis backend admits from what it took ahead), one slot.
ONE_SLOT = LimitSpec(requests=Rate(60_000, 1000.0), tokens=Rate(600_000, 100_000.0), max_in_flight=1)


async def test_a_sequential_client_alternating_models_is_never_refused(store: Backend) -> None:
    """One request at a time, models in turn (and "-", the bucket of requests naming none): the
    key's one slot, freed by each request, is free for the next at once, whatever its model."""
    for model in ["demo-model", "second-model", "-"] * 4:
        ticket, decision = await admit(store, ask(10, ONE_SLOT, model=model))
        assert decision.allowed, (model, decision.reason)
        store.release(ticket, 10)


async def test_too_large_is_refused_for_good(store: Backend) -> None:
    _, refused = await admit(store, ask(101))
    assert (refused.allowed, refused.reason, refused.retry_after_s) == (False, "too_large", float("inf"))
    assert refused.tokens_remaining == 100


async def test_clock_stepping_back(store: Backend, clock: FakeClock) -> None:
    for _ in range(3):
        await admit(store, ask(0))
    clock.advance(-30)
    assert not (await admit(store, ask(0)))[1].allowed
    clock.advance(30.5)
    assert not (await admit(store, ask(0)))[1].allowed
    clock.advance(0.5)
    assert (await admit(store, ask(0)))[1].allowed


# -- Redis only -------------------------------------------------------------------------------------


@pytest.fixture
async def redis_store(clock: FakeClock, redis_url: str, redis_prefix: str) -> AsyncIterator[RedisBackend]:
    config = redis_config(redis_url, redis_prefix, timeout_ms=1000, in_flight_lease_s=5)
    backend = RedisBackend(config, clock, now=clock.now)
    yield backend
    await backend.aclose()


async def test_keys_are_hash_tagged_by_scope_and_expire(
    redis_store: RedisBackend, sync_redis: redis.Redis, redis_prefix: str
) -> None:
    capped = dataclasses.replace(SPEC, max_in_flight=4)
    await admit(redis_store, ask(10, capped))
    keys = sorted(k.decode() for k in sync_redis.keys(redis_prefix + "*") if isinstance(k, bytes))
    assert keys == [f"{redis_prefix}{{acme}}:demo-model", f"{redis_prefix}{{acme}}:inflight:k1"]
    assert all(0 < sync_redis.pttl(k) <= 6000 for k in keys)  # refill time (3 s) + 1 s; lease 5 s + 1 s


async def test_an_in_flight_slot_never_released_expires_with_its_lease(
    redis_store: RedisBackend, clock: FakeClock
) -> None:
    capped = dataclasses.replace(SPEC, requests=None, tokens=None, max_in_flight=1)
    await admit(redis_store, ask(0, capped))  # its sidecar "dies": never released
    assert not (await admit(redis_store, ask(0, capped)))[1].allowed
    clock.advance(5.1)
    assert (await admit(redis_store, ask(0, capped)))[1].allowed


async def test_a_slot_freed_on_one_sidecar_is_free_on_another_at_once(
    clock: FakeClock, redis_url: str, redis_prefix: str
) -> None:
    """Two sidecars' backends on one Redis, one slot: a request finished on one leaves the slot
    free for the key's next request on the other as soon as its release reached Redis, with no
    wait for lease_ms."""
    one, two = (
        RedisBackend(redis_config(redis_url, redis_prefix, timeout_ms=1000), clock, now=clock.now)
        for _ in range(2)
    )
    try:
        for model in ["demo-model", "second-model"] * 3:
            for backend in (one, two):
                ticket, decision = await admit(backend, ask(10, ONE_SLOT, model=model))
                assert decision.allowed, decision.reason
                backend.release(ticket, 10)
                # The slot's release goes to Redis as the request ends, not awaited: another
                # sidecar's next request sees it once that round trip is done (no lease_ms wait).
                await settled(backend)
        held, _ = await admit(one, ask(10, ONE_SLOT))
        _, refused = await admit(two, ask(10, ONE_SLOT))  # the limit holds across the two
        assert refused.reason == "in_flight"
        one.release(held, 10)
    finally:
        await one.aclose()
        await two.aclose()


async def test_near_the_in_flight_limit_a_freed_slot_goes_back_at_once(
    clock: FakeClock, redis_url: str, redis_prefix: str
) -> None:
    """Two requests in progress on one sidecar, limit 2: when one ends, the other sidecar gets its
    slot at once (the first keeps no freed slot for itself this near the limit)."""
    two_slots = dataclasses.replace(ONE_SLOT, max_in_flight=2)
    one, two = (
        RedisBackend(redis_config(redis_url, redis_prefix, timeout_ms=1000), clock, now=clock.now)
        for _ in range(2)
    )
    try:
        first, _ = await admit(one, ask(10, two_slots))
        second, _ = await admit(one, ask(10, two_slots, model="second-model"))
        one.release(first, 10)
        await settled(one)  # (its round trip: see the test above)
        ticket, decision = await admit(two, ask(10, two_slots))
        assert decision.allowed, decision.reason
        _, refused = await admit(one, ask(10, two_slots))  # and exact: 2 in progress, 2 allowed
        assert refused.reason == "in_flight"
        one.release(second, 10)
        two.release(ticket, 10)
    finally:
        await one.aclose()
        await two.aclose()


async def test_an_admission_whose_caller_left_is_given_back(redis_store: RedisBackend) -> None:
    capped = dataclasses.replace(SPEC, max_in_flight=1)
    task = asyncio.ensure_future(redis_store.acquire(ask(60, capped)))
    await asyncio.sleep(0)  # submitted, waiting for the round trip
    task.cancel()
    await redis_store.batcher.drain()
    await redis_store.batcher.drain()  # the give-back goes out in a round trip of its own
    _, d = await admit(redis_store, ask(60, capped))
    assert d.allowed and d.tokens_remaining == 40  # the 60 of the abandoned one came back


async def test_a_flushed_script_cache_is_reloaded(private_redis: RedisServer, clock: FakeClock) -> None:
    backend = RedisBackend(redis_config(private_redis.url, "t:", timeout_ms=1000), clock, now=clock.now)
    try:
        assert (await admit(backend, ask(1)))[1].allowed
        redis.Redis.from_url(private_redis.url).script_flush()
        _, d = await admit(backend, ask(1))
        assert d.allowed and d.tokens_remaining == 98
    finally:
        await backend.aclose()


# -- failures: deadlines and the breaker --------------------------------------------------------------


class Blackhole:
    """A TCP server that accepts and never answers: a hung Redis."""

    def __init__(self) -> None:
        self.accepted = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> Blackhole:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.accepted += 1
            self.writers.append(writer)

        self.server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"redis://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/0"

    async def __aexit__(self, *exc: object) -> None:
        for w in self.writers:
            w.close()
        assert self.server is not None
        self.server.close()


async def timed_acquire(backend: RedisBackend, claim: Ask) -> tuple[Ticket, float]:
    start = time.perf_counter()
    ticket = await backend.acquire(claim)
    return ticket, time.perf_counter() - start


async def test_a_hung_redis_costs_one_deadline_then_nothing(clock: FakeClock) -> None:
    async with Blackhole() as hole:
        config = redis_config(hole.url, "t:", timeout_ms=50, breaker_failures=2, breaker_open_s=5)
        backend = RedisBackend(config, clock)
        try:
            waits = []
            for _ in range(2):
                ticket, waited = await timed_acquire(backend, ask(1))
                assert ticket.decision is None  # on_redis_error: allow
                waits.append(waited)
            assert all(0.04 < w < 0.5 for w in waits), waits
            assert backend.breaker.state == "open"
            ticket, waited = await timed_acquire(backend, ask(1))
            assert ticket.decision is None and waited < 0.005  # Redis is not even tried
        finally:
            await backend.aclose()


async def test_on_redis_error_deny_answers_503(clock: FakeClock) -> None:
    config = dataclasses.replace(
        redis_config(f"redis://127.0.0.1:{free_port()}/0", "t:", timeout_ms=50), on_redis_error="deny"
    )
    backend = RedisBackend(config, clock)
    try:
        start = time.perf_counter()
        with pytest.raises(RateLimiterUnavailable) as info:
            await backend.acquire(ask(1))
        assert time.perf_counter() - start < 0.5
        assert (info.value.status, info.value.code) == (503, "rate_limiter_unavailable")
    finally:
        await backend.aclose()


async def test_the_breaker_lets_one_probe_through_and_closes_when_redis_is_back(
    private_redis: RedisServer, clock: FakeClock
) -> None:
    config = redis_config(private_redis.url, "t:", timeout_ms=200, breaker_failures=1, breaker_open_s=2)
    backend = RedisBackend(config, clock)
    try:
        assert (await admit(backend, ask(1)))[1].allowed
        private_redis.stop()
        assert (await backend.acquire(ask(1))).decision is None
        assert backend.breaker.state == "open"
        private_redis.start()
        assert (await backend.acquire(ask(1))).decision is None  # still open: Redis not asked
        clock.advance(2.0)
        _, d = await admit(backend, ask(1))  # the probe
        assert d.allowed
        assert backend.breaker.state == "closed"  # type: ignore[comparison-overlap]  # narrowed above
        assert d.tokens_remaining == 99  # a fresh server: a fresh bucket
    finally:
        await backend.aclose()


async def test_an_in_flight_slot_freed_while_redis_is_down_is_freed_when_it_is_back(clock: FakeClock) -> None:
    with RedisServer(persist=True) as server:  # its data survives the restart
        config = redis_config(server.url, "t:", timeout_ms=200, breaker_failures=1, breaker_open_s=2)
        backend = RedisBackend(config, clock)
        capped = dataclasses.replace(SPEC, max_in_flight=1)
        try:
            ticket, d = await admit(backend, ask(10, capped))
            assert d.allowed
            server.stop()
            backend.release(ticket, 4)  # its slot is kept for reuse, then given back when idle
            clock.advance(0.2)  # idle longer than lease_ms (100 ms)
            await asyncio.sleep(0.15)  # the flush: its give-back fails
            await backend.batcher.drain()
            assert backend.breaker.state == "open"
            server.start()
            clock.advance(2.0)
            _, again = await admit(backend, ask(10, capped))  # the probe carries the held release first
            assert again.allowed, again
        finally:
            await backend.aclose()
