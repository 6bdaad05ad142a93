"""The ``rate_limit`` middleware's options, and the bucket specs derived from them once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from middleware.rate_limit.bucket import LimitSpec, Rate
from middleware.redis_url import redis_problems
from proxy.config import opt
from proxy.identity import KeyLimits


@dataclass(frozen=True)
class RedisConfig:
    url: str = opt(
        "redis://127.0.0.1:6379/0", "the Redis the sidecars of a fleet share (redis://, rediss://)"
    )
    key_prefix: str = opt("llm-sidecar:rl:", "prefix of every key this middleware writes", min_len=1)
    timeout_ms: float = opt(50.0, "longest wait for a Redis round trip; then on_redis_error decides", min=1)
    max_connections: int = opt(
        4, "connections to Redis, each one round trip at a time (calls meanwhile go in its next)", min=1
    )
    breaker_failures: int = opt(3, "failed round trips in a row after which Redis is skipped", min=1)
    breaker_open_s: float = opt(2.0, "how long Redis is skipped before one request tries it again", min=0.01)
    lease_ms: float = opt(
        100.0,
        "requests and tokens a sidecar takes from Redis ahead: about this long of its recent demand "
        "(never more than an eighth of what a bucket holds), and how long what it holds unused (and "
        "its freed in-flight slots) stays before going back; 0: every request asks Redis",
        min=0,
        max=10_000,
    )
    in_flight_lease_s: float = opt(
        900.0,
        "an in-flight slot never released (a sidecar killed mid-request) frees itself after this",
        min=1,
    )

    def validate(self) -> list[tuple[str, str]]:
        return redis_problems(self.url, self.key_prefix)


@dataclass(frozen=True)
class RateLimitConfig:
    backend: Literal["memory", "redis"] = opt(
        "memory", "memory: this process only; redis: one limit shared by every sidecar using that Redis"
    )
    per: Literal["tenant", "key"] = opt("tenant", "buckets per (tenant, model) or per (API key, model)")
    requests_per_minute: int | None = opt(None, "requests per minute per bucket (unset: not limited)", min=1)
    tokens_per_minute: int | None = opt(
        None, "LLM tokens (prompt + completion) per minute per bucket (unset: not limited)", min=1
    )
    burst: float = opt(
        1.0,
        "bucket size as a share of the per-minute limit (1: a minute's worth at once)",
        min=0.001,
        max=1000,
    )
    max_in_flight: int | None = opt(None, "requests of one API key in progress at once (unset: any)", min=1)
    default_max_tokens: int = opt(
        1024, "completion tokens reserved for a request that sets no max_tokens (settled at the end)", min=0
    )
    chars_per_token: float = opt(4.0, "prompt tokens are estimated as prompt characters / this", min=0.5)
    stream_usage: bool = opt(
        True, "ask backends for usage in streams (stream_options.include_usage), hidden from clients"
    )
    max_usage_body_bytes: int = opt(
        4 * 1024 * 1024, "a streamed JSON answer up to this size is kept (a copy) to read its usage", min=0
    )
    on_redis_error: Literal["allow", "deny"] = opt(
        "allow", "when Redis fails or is slow: allow the request unlimited, or deny it with 503"
    )
    redis: RedisConfig = opt(RedisConfig(), "the shared store, for backend: redis")
    max_buckets: int = opt(100_000, "memory backend: buckets kept, least recently used dropped", min=1)

    def spec(self, limits: KeyLimits) -> LimitSpec:
        """The buckets of a key with ``limits`` (its own values override the defaults)."""
        requests = limits.requests_per_minute or self.requests_per_minute
        tokens = limits.tokens_per_minute or self.tokens_per_minute
        return LimitSpec(
            requests=self._rate(requests),
            tokens=self._rate(tokens),
            max_in_flight=limits.max_in_flight or self.max_in_flight or 0,
        )

    def _rate(self, per_minute: int | None) -> Rate | None:
        if per_minute is None:
            return None
        return Rate(per_minute, max(1.0, per_minute * self.burst))
