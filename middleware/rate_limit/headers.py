"""Rate-limit response headers in OpenAI's formats, which the openai SDK reads.

Every answer: ``x-ratelimit-limit-{requests,tokens}`` (the per-minute limit),
``x-ratelimit-remaining-…`` (what the bucket holds after this request) and ``x-ratelimit-reset-…``
(until the bucket is full again, as a Go duration: ``20ms``, ``1.5s``, ``6m0s``). A 429 adds
``Retry-After`` (whole seconds, rounded up) and ``retry-after-ms``; the SDK prefers the latter.
"""

from __future__ import annotations

import math

from middleware.rate_limit.bucket import Decision, LimitSpec

Headers = list[tuple[bytes, bytes]]


def duration(seconds: float) -> str:
    """``seconds`` as Go's time.Duration prints it, to the millisecond (rounded up): 0s, 20ms, 1.5s, 6m0s."""
    ms = math.ceil(seconds * 1000 - 1e-6)  # up, so that waiting this long is always enough
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = str(rest // 1000) if rest % 1000 == 0 else f"{rest / 1000:.3f}".rstrip("0")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def reset_value(seconds: float) -> bytes:
    """``duration(seconds)`` as a header value; under a second (the usual case) without the detour."""
    ms = math.ceil(seconds * 1000 - 1e-6)
    if 0 < ms < 1000:
        return b"%dms" % ms
    return duration(seconds).encode()


def ratelimit_headers(spec: LimitSpec, decision: Decision) -> Headers:
    req, tok = spec.requests, spec.tokens
    requests: Headers = []
    if req is not None:
        requests = [
            (b"x-ratelimit-limit-requests", req.shown),
            (b"x-ratelimit-remaining-requests", b"%d" % decision.requests_remaining),
            (b"x-ratelimit-reset-requests", reset_value(decision.requests_reset_s)),
        ]
    if tok is None:
        return requests
    return [
        *requests,
        (b"x-ratelimit-limit-tokens", tok.shown),
        (b"x-ratelimit-remaining-tokens", b"%d" % decision.tokens_remaining),
        (b"x-ratelimit-reset-tokens", reset_value(decision.tokens_reset_s)),
    ]


def retry_headers(seconds: float) -> Headers:
    """``Retry-After`` and ``retry-after-ms`` for a wait of ``seconds``; a wait that can never end
    (a request larger than the bucket) says so with ``x-should-retry: false`` instead."""
    if math.isinf(seconds):
        return [(b"x-should-retry", b"false")]
    ms = max(1, math.ceil(seconds * 1000 - 1e-6))
    return [(b"retry-after", b"%d" % math.ceil(ms / 1000)), (b"retry-after-ms", b"%d" % ms)]


RATELIMIT_NAMES = frozenset(
    b"x-ratelimit-%b-%b" % (what, kind)
    for what in (b"limit", b"remaining", b"reset")
    for kind in (b"requests", b"tokens")
)
