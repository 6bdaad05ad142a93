"""Circuit breakers shared by the sidecars of a fleet through Redis (``circuit_breaker.shared``).

When a breaker here opens, the other sidecars learn it within ``poll_s`` and keep that upstream
open too, so a dead replica costs the fleet one breaker's worth of failures, not one per sidecar.

It never blocks a request: one background task per sidecar, started with the sidecar, does
all the talking, one pipelined round trip per ``poll_s``: ``SET <key> 1 PX <ms it stays open>`` for
each breaker that opened here since the last round, then ``PTTL`` of every upstream's key; a key
still alive opens the local breaker for what is left of it. Durations, not clock times, cross
the wire, so the sidecars' clocks need not agree. The keys share one hash tag (one Redis Cluster
slot) and expire by themselves; nothing is deleted. While Redis fails (a round trip over
``timeout_ms``), each breaker keeps working alone; the failure and the recovery are logged once,
and what was not published is sent with the next round that works.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis.asyncio
from redis.exceptions import RedisError

from middleware.circuit_state import CircuitState
from middleware.redis_url import redis_problems
from proxy.clock import Clock
from proxy.config import opt, req
from proxy.metrics import Counter

log = logging.getLogger("llm_sidecar.circuit_breaker")


@dataclass(frozen=True)
class SharedBreakerConfig:
    url: str = req("redis://host:port/db (rediss:// for TLS) that the sidecars of a fleet share")
    key_prefix: str = opt("llm-sidecar:cb:", "prefix of the keys (one per upstream)", min_len=1)
    poll_s: float = opt(0.5, "how often opens are published and the other sidecars' read", min=0.01)
    timeout_ms: float = opt(200.0, "longest wait for one round trip to Redis", min=1)

    def validate(self) -> list[tuple[str, str]]:
        return redis_problems(self.url, self.key_prefix)


class BreakerShare:
    def __init__(
        self,
        cfg: SharedBreakerConfig,
        breakers: dict[str, CircuitState],
        clock: Clock,
        failures: Counter | None = None,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        self.failures = failures if failures is not None else Counter("redis_failures", "", ("user",))
        self._error = ""  # how the last round failed ("" when it worked)
        self.track(breakers)
        self.timeout_s = cfg.timeout_ms / 1000
        self._task: asyncio.Task[None] | None = None
        self._redis: redis.asyncio.Redis | None = None
        self._failing = False
        self.rounds = 0  # round trips that worked (tests, logs)

    def track(self, breakers: dict[str, CircuitState]) -> None:
        """Share these breakers from the next round on (a reload may change the upstreams)."""
        self.breakers = breakers
        self.names = tuple(breakers)
        self.keys = {name: f"{self.cfg.key_prefix}{{circuit}}:{name}" for name in self.names}
        self._pending: set[str] = set()  # upstreams whose breaker opened here, to publish

    def start(self) -> None:
        """Start the background task on the running loop (``CircuitBreaker.start``; once)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="breaker-share")

    def problems(self) -> list[str]:
        """Not ready while the last round with Redis (every ``poll_s``) failed."""
        if not self._error:
            return []
        parts = urlsplit(self.cfg.url)  # host and port only: the URL may hold a password
        where = f"{parts.hostname or parts.path}:{parts.port or 6379}"
        return [f"Redis at {where} failed the last round ({self._error}); each breaker works alone"]

    def opened(self, upstream: str) -> None:
        """The breaker of ``upstream`` opened here: tell the others with the next round."""
        self._pending.add(upstream)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def _run(self) -> None:
        self._redis = redis.asyncio.Redis.from_url(
            self.cfg.url,
            socket_timeout=self.timeout_s,
            socket_connect_timeout=self.timeout_s,
            retry_on_timeout=False,
        )
        while True:
            pending, self._pending = self._pending, set()
            try:
                await asyncio.wait_for(self._round(pending), self.timeout_s)
            except (RedisError, OSError, TimeoutError) as e:
                self._pending |= pending  # published with the next round that works
                self.failures.inc(("circuit_breaker",))
                self._error = f"{type(e).__name__}: {e or 'no answer in time'}"
                if not self._failing:
                    self._failing = True
                    log.warning("shared circuit breakers: Redis failed (%s); each works alone", e)
            else:
                self.rounds += 1
                self._error = ""
                if self._failing:
                    self._failing = False
                    log.warning("shared circuit breakers: Redis answers again")
            await self.clock.sleep(self.cfg.poll_s)

    async def _round(self, pending: set[str]) -> None:
        assert self._redis is not None
        publish = [(name, int(self.breakers[name].retry_after() * 1000)) for name in pending]
        publish = [(name, ms) for name, ms in publish if ms > 0]  # (still open here)
        async with self._redis.pipeline(transaction=False) as pipe:
            for name, ms in publish:
                pipe.set(self.keys[name], b"1", px=ms)
            for name in self.names:
                pipe.pttl(self.keys[name])
            replies = await pipe.execute()
        now = self.clock.now()
        for name, ttl in zip(self.names, replies[len(publish) :], strict=True):
            if isinstance(ttl, int) and ttl > 0:
                self.breakers[name].open_until(now + ttl / 1000)
