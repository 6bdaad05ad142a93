"""Fixtures for every test: Redis (per design.md: REDIS_URL, else 127.0.0.1:6379, else a private
redis-server started for the session; never a skip) and a key prefix of its own for each test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from tests.redis_proc import RedisServer, shared_redis_url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = shared_redis_url()
    if url is not None:
        yield url
        return
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix no other test (or test run) uses, so runs sharing one Redis never collide."""
    return f"llm-sidecar-test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test alone, which it may stop, restart or flush."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def sync_redis(redis_url: str) -> Iterator[redis.Redis]:
    """A plain redis-py client of the tests' Redis, to look at what the sidecar wrote."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()
