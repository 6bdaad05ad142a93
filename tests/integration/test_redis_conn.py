"""The rate limiter's own Redis connection (middleware/rate_limit/redis_conn.py) against a real Redis:
what the URL asks for (db, password), a connection the server closed while idle, a batch of
replies, and the deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import redis

from middleware.rate_limit.backend import Ask
from middleware.rate_limit.bucket import LimitSpec, Rate
from middleware.rate_limit.config import RateLimitConfig, RedisConfig
from middleware.rate_limit.redis_backend import RedisBackend
from middleware.rate_limit.redis_conn import Endpoint, RedisConnection
from middleware.rate_limit.resp import encode
from proxy.clock import FakeClock
from tests.redis_proc import RedisServer

SPEC = LimitSpec(requests=Rate(60, 5.0), tokens=None, max_in_flight=0)
CLAIM = Ask(scope="acme", model="demo-model", key_id="k1", spec=SPEC, tokens=0)


@contextlib.asynccontextmanager
async def backend(url: str, prefix: str = "t:") -> AsyncIterator[RedisBackend]:
    config = RateLimitConfig(backend="redis", redis=RedisConfig(url=url, key_prefix=prefix, timeout_ms=1000))
    store = RedisBackend(config, FakeClock(start=1_700_000_000.0))
    try:
        yield store
    finally:
        await store.aclose()


def deadline(seconds: float = 1.0) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_the_db_of_the_url_is_selected(redis_url: str, redis_prefix: str) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/3"
    async with backend(url, redis_prefix) as store:
        assert (await store.acquire(CLAIM)).decision is not None
    client = redis.Redis.from_url(url)
    try:
        assert client.exists(f"{redis_prefix}{{acme}}:demo-model") == 1
        client.delete(f"{redis_prefix}{{acme}}:demo-model")
    finally:
        client.close()


async def test_the_password_of_the_url_is_sent_and_a_wrong_one_fails(private_redis: RedisServer) -> None:
    admin = redis.Redis.from_url(private_redis.url)
    admin.config_set("requirepass", "s3cret")
    admin.close()
    port = private_redis.port
    async with backend(f"redis://:s3cret@127.0.0.1:{port}/0") as store:
        decision = (await store.acquire(CLAIM)).decision
        assert decision is not None and decision.allowed
    async with backend(f"redis://default:wrong@127.0.0.1:{port}/0") as store:
        assert (await store.acquire(CLAIM)).decision is None  # refused: allowed unchecked
        assert store.breaker.failures == 1


async def test_a_connection_the_server_closed_while_idle_is_opened_again(private_redis: RedisServer) -> None:
    async with backend(private_redis.url) as store:
        assert (await store.acquire(CLAIM)).decision is not None
        admin = redis.Redis.from_url(private_redis.url)
        try:
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
        finally:
            admin.close()
        await asyncio.sleep(0.05)
        decision = (await store.acquire(CLAIM)).decision
        assert decision is not None and decision.requests_remaining == 3
        assert store.breaker.failures == 0


async def test_one_write_many_replies_in_order(redis_url: str, redis_prefix: str) -> None:
    conn = RedisConnection(Endpoint(redis_url))
    key = f"{redis_prefix}n".encode()
    try:
        commands = [encode([b"INCR", key]) for _ in range(200)] + [encode([b"NOSUCHCOMMAND"])]
        replies = await conn.exchange(commands, deadline())
        assert replies[:200] == list(range(1, 201))
        assert isinstance(replies[200], redis.ResponseError)
        assert await conn.exchange([encode([b"DEL", key])], deadline()) == [1]  # still in step
    finally:
        conn.disconnect()


async def test_past_the_deadline_the_round_trip_fails_and_the_connection_starts_afresh(
    redis_url: str,
) -> None:
    conn = RedisConnection(Endpoint(redis_url))
    try:
        with pytest.raises(TimeoutError):
            await conn.exchange([encode([b"BLPOP", b"llm-sidecar-test:nothing", b"1"])], deadline(0.05))
        assert not conn.is_connected
        assert await conn.exchange([encode([b"PING"])], deadline()) == [b"PONG"]
    finally:
        conn.disconnect()
