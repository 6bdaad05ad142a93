"""The circuit breaker of one upstream: a pure state machine on the injected clock (no I/O).

    closed ──(a trip rule fires)──► open ──(open_s later)──► half-open
      ▲                                                         │
      └──(half_open_probes probes succeed)──────────────────────┤
                                    open ◄──(a probe fails)─────┘

Trip rules, checked as calls end (whichever fires first):
- ``consecutive_failures`` failures in a row;
- a failure ratio ≥ ``failure_ratio`` over the calls that ended in the last ``window_s`` seconds,
  once there were at least ``min_calls`` of them (``middleware.window.WindowCounts``);
- ``slow_calls`` successes in a row that the caller found slow (``success(slow=True)``: the
  middleware decides what slow is — a stream's first byte later than ``slow_call_s``).
While open, no call is let through; after ``open_s`` up to ``half_open_probes`` calls go at once
as probes; a failed or slow probe opens it again for another ``open_s``.

Why not pybreaker (named by the user; not a dependency, see README's Dependencies): it counts only
failures in a row (no ratio over a window, no slow calls), lets one trial call through in half-open,
reads the wall clock (``datetime.now``) with no way to inject one, and locks per call; this class
covers the rules above in ~100 lines, with the clock the tests drive by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from middleware.window import WindowCounts
from proxy.clock import Clock

State = Literal["closed", "open", "half_open"]
CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"


@dataclass(frozen=True)
class TripRules:
    consecutive_failures: int = 5
    failure_ratio: float = 0.5
    window_s: int = 10
    min_calls: int = 20
    slow_calls: int = 5
    open_s: float = 5.0
    half_open_probes: int = 3


class CircuitState:
    __slots__ = (
        "clock",
        "consecutive",
        "opened_at",
        "probes_out",
        "probes_passed",
        "rules",
        "slow_streak",
        "state",
        "trips",
        "window",
    )

    def __init__(self, rules: TripRules, clock: Clock) -> None:
        self.rules = rules
        self.clock = clock
        self.state: State = CLOSED
        self.consecutive = 0  # failures in a row
        self.slow_streak = 0  # slow successes in a row
        self.opened_at = 0.0
        self.probes_out = 0  # half-open: probes let through and not yet ended
        self.probes_passed = 0
        self.trips = 0  # times it opened (a metric)
        self.window = WindowCounts(rules.window_s)  # (calls, failures)

    # -- admission ---------------------------------------------------------------------------------
    def available(self) -> bool:
        """Would a call be let through now? (No change of state: for picking a target.)"""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            return self.clock.now() >= self.opened_at + self.rules.open_s
        return self.probes_out < self.rules.half_open_probes

    def acquire(self) -> bool:
        """Let one call through, or not. Every call let through must end in exactly one of
        :meth:`success`, :meth:`failure` or :meth:`release`."""
        if self.state == CLOSED:
            return True
        if self.state == OPEN:
            if self.clock.now() < self.opened_at + self.rules.open_s:
                return False
            self.state = HALF_OPEN
            self.probes_out = 0
            self.probes_passed = 0
        if self.probes_out >= self.rules.half_open_probes:
            return False
        self.probes_out += 1
        return True

    def retry_after(self) -> float:
        """Seconds until it lets a call through again (0 when it does now)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.opened_at + self.rules.open_s - self.clock.now())

    # -- outcomes ----------------------------------------------------------------------------------
    def success(self, slow: bool = False, now: float | None = None) -> None:
        """A call ended well (``slow``: but slowly); ``now``: the clock's time, when the caller has it."""
        if self.state == CLOSED:
            self.consecutive = 0
            self.window.add(self.clock.now() if now is None else now, 1, 0)
            if not slow:
                self.slow_streak = 0
                return
            self.slow_streak += 1
            if self.slow_streak >= self.rules.slow_calls:
                self._open()
            return
        if self.state == OPEN:
            return  # a call let through before it opened: no news
        self.probes_out -= 1  # half-open: a probe came back
        if slow:
            self._open()
            return
        self.probes_passed += 1
        if self.probes_passed >= self.rules.half_open_probes:
            self._close()

    def failure(self) -> None:
        if self.state == HALF_OPEN:
            self.probes_out -= 1
            self._open()
            return
        if self.state == OPEN:
            return
        self.consecutive += 1
        self.slow_streak = 0
        now = self.clock.now()
        self.window.add(now, 1, 1)
        calls, failures = self.window.totals(now)
        rules = self.rules
        if self.consecutive >= rules.consecutive_failures or (
            calls >= rules.min_calls and failures >= rules.failure_ratio * calls
        ):
            self._open()

    def release(self) -> None:
        """A call let through ended with no verdict on the upstream (the client left, the request
        was refused before it was sent)."""
        if self.state == HALF_OPEN:
            self.probes_out -= 1

    def open_until(self, until: float) -> None:
        """Another sidecar's breaker of this upstream is open until ``until`` (this clock's time):
        stay open until then too (``circuit_breaker.shared``). Not counted in ``trips``."""
        if until <= self.clock.now():
            return
        if self.state == OPEN and self.opened_at + self.rules.open_s >= until:
            return  # open here at least as long already
        self.state = OPEN
        self.opened_at = until - self.rules.open_s

    # -- internals ---------------------------------------------------------------------------------
    def _open(self) -> None:
        self.state = OPEN
        self.opened_at = self.clock.now()
        self.trips += 1

    def _close(self) -> None:
        self.state = CLOSED
        self.consecutive = 0
        self.slow_streak = 0
        self.window.clear()
