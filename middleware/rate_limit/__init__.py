"""``type: rate_limit``: see middleware.py; the bucket math is bucket.py, the stores memory.py and
redis_backend.py (with allowance.py, lua.py and breaker.py), token estimates estimate.py, settlement
settle.py."""

from middleware.rate_limit.config import RateLimitConfig
from middleware.rate_limit.middleware import RateLimit

__all__ = ["RateLimit", "RateLimitConfig"]
