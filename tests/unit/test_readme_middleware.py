"""The README's middleware sections name every option the built-in middleware accept."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from middleware.api_keys import ApiKeyConfig
from middleware.auth import AuthConfig
from middleware.breaker_share import SharedBreakerConfig
from middleware.circuit_breaker import CircuitBreakerConfig
from middleware.rate_limit.config import RateLimitConfig, RedisConfig
from middleware.retry import RetryConfig
from proxy.identity import KeyLimits

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_middleware_section_names_every_built_in_option() -> None:
    section = README.split("## Middleware", 1)[1].split("### Writing a middleware", 1)[0]
    missing = [
        f"{cls.__name__}.{f.name}"
        for cls in (
            AuthConfig,
            ApiKeyConfig,
            KeyLimits,
            RateLimitConfig,
            RedisConfig,
            RetryConfig,
            CircuitBreakerConfig,
            SharedBreakerConfig,
        )
        for f in dataclasses.fields(cls)
        if f.init and not re.search(rf"[`{{ ]{f.name}[`,}}]", section)
    ]
    assert not missing, f"README's Middleware section does not mention {missing}"
