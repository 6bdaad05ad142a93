"""A small circuit breaker for the Redis store, on the injected clock.

closed ──(``failures`` failed round trips in a row)──► open ──(``open_s`` later)──► half-open:
one round trip goes through as a probe; it succeeding closes the breaker, failing re-opens it.
While open (and while the probe is out) Redis is not called at all, so a dead Redis costs a
request nothing but an attribute check, and the sidecar notices by itself when Redis is back.

Why not pybreaker (named by the user; not a dependency, see README's Dependencies): it reads the
wall clock (``datetime.now``) with no way to inject one, its async support needs tornado, and it
locks per call; these dozen lines take the clock the rest of the sidecar uses, so the tests drive
time by hand.
"""

from __future__ import annotations

from typing import Final, Literal

from proxy.clock import Clock

State = Literal["closed", "open", "half_open"]
CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"


class Breaker:
    __slots__ = ("clock", "failures", "open_s", "opened_at", "state", "threshold")

    def __init__(self, threshold: int, open_s: float, clock: Clock) -> None:
        self.threshold = threshold
        self.open_s = open_s
        self.clock = clock
        self.state: State = CLOSED
        self.failures = 0
        self.opened_at = 0.0

    def allow(self) -> bool:
        """May the next round trip go to Redis? (Turns open into half-open when it is time.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN and self.clock.now() >= self.opened_at + self.open_s:
            self.state = HALF_OPEN
            return True  # this caller is the probe
        return False

    def success(self) -> bool:
        """A round trip worked; True when that closed the breaker."""
        self.failures = 0
        if self.state == CLOSED:
            return False
        self.state = CLOSED
        return True

    def failure(self) -> bool:
        """A round trip failed; True when that opened the breaker."""
        self.failures += 1
        if self.state == HALF_OPEN or (self.state == CLOSED and self.failures >= self.threshold):
            reopened = self.state == HALF_OPEN
            self.state = OPEN
            self.opened_at = self.clock.now()
            return not reopened
        return False
