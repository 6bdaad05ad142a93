"""Checks of the Redis settings that middleware share (``rate_limit.redis``, ``circuit_breaker.shared``)."""

from __future__ import annotations

from urllib.parse import urlsplit


def redis_problems(url: str, key_prefix: str) -> list[tuple[str, str]]:
    """Config problems of a Redis ``url`` and ``key_prefix`` as ``(key, message)`` pairs."""
    problems = []
    if urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        problems.append(("url", f"must be redis://host:port/db, rediss://… or unix://…, got {url!r}"))
    if "{" in key_prefix or "}" in key_prefix:
        problems.append(("key_prefix", "must not contain '{' or '}' (they mark the Redis Cluster hash tag)"))
    return problems
