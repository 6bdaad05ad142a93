"""The pure parts of ``retry``: the backoff, the retry budget and reading ``Retry-After``.

No I/O and no clock reads of their own: the middleware passes ``now`` and the random source in,
so the tests drive them with a fake clock and a seed.
"""

from __future__ import annotations

import random
from email.utils import parsedate_to_datetime

from middleware.window import WindowCounts
from proxy.http import Headers


class Backoff:
    """Full-jitter exponential backoff: the wait before retry ``n`` (0-based) is uniform in
    ``[0, min(cap_s, base_s · 2ⁿ)]``, so clients that failed together do not come back together."""

    __slots__ = ("base_s", "cap_s", "rng")

    def __init__(self, base_s: float, cap_s: float, rng: random.Random) -> None:
        if not 0 < base_s <= cap_s:
            raise ValueError(f"backoff needs 0 < base_s ≤ cap_s, got base_s={base_s}, cap_s={cap_s}")
        self.base_s = base_s
        self.cap_s = cap_s
        self.rng = rng

    def delay(self, retry: int) -> float:
        ceiling = self.cap_s if retry >= 32 else min(self.cap_s, self.base_s * (1 << retry))
        return self.rng.uniform(0.0, ceiling)


class RetryBudget:
    """Retries may add at most ``ratio`` of the requests seen over the last ``window_s`` seconds,
    plus ``floor`` retries per window so that a quiet sidecar can still retry at all.

    A dead fleet is then hit (1 + ratio)× as hard, not ``attempts``× as hard.
    """

    __slots__ = ("floor", "ratio", "window")

    def __init__(self, ratio: float, floor: int, window_s: int) -> None:
        if ratio < 0 or floor < 0 or window_s < 1:
            raise ValueError("retry budget needs ratio ≥ 0, floor ≥ 0 and window_s ≥ 1")
        self.ratio = ratio
        self.floor = floor
        self.window = WindowCounts(window_s)  # (requests, retries)

    def request(self, now: float) -> None:
        """A request came in (its first attempt)."""
        self.window.add(now, 1, 0)

    def try_retry(self, now: float) -> bool:
        """May one more retry go out now? If so, it is counted."""
        requests, retries = self.window.totals(now)
        if retries + 1 > self.floor + self.ratio * requests:
            return False
        self.window.add(now, 0, 1)
        return True


def retry_after_s(headers: Headers, now_wall: float) -> float | None:
    """The wait an answer asks for: ``retry-after-ms`` (OpenAI's, milliseconds), else
    ``Retry-After`` in seconds or as an HTTP date (``now_wall``: the wall clock, epoch seconds)."""
    ms = headers.get(b"retry-after-ms")
    if ms is not None:
        try:
            value = float(ms)
        except ValueError:
            value = -1.0
        if value >= 0 and value == value:  # not NaN
            return value / 1000
    raw = headers.get(b"retry-after")
    if raw is None:
        return None
    text = raw.decode("latin-1").strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(text).timestamp() - now_wall
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        return max(0.0, seconds)
    return seconds if seconds >= 0 and seconds == seconds else None
