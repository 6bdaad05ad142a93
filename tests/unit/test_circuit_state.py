"""The circuit breaker state machine (middleware/circuit_state.py) on a fake clock."""

from __future__ import annotations

from middleware.circuit_state import CLOSED, HALF_OPEN, OPEN, CircuitState, TripRules
from proxy.clock import FakeClock


def breaker(clock: FakeClock, **rules: float) -> CircuitState:
    return CircuitState(TripRules(**rules), clock)  # type: ignore[arg-type]


def state(b: CircuitState) -> str:
    return b.state  # (read through a function: mypy would keep the narrowed literal otherwise)


def fail(b: CircuitState, n: int) -> None:
    for _ in range(n):
        assert b.acquire()
        b.failure()


def succeed(b: CircuitState, n: int, slow: bool = False) -> None:
    for _ in range(n):
        assert b.acquire()
        b.success(slow)


def test_consecutive_failures_open_it_and_a_success_between_resets_the_count() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=5, min_calls=1000)
    fail(b, 4)
    succeed(b, 1)
    fail(b, 4)
    assert state(b) == CLOSED
    fail(b, 1)
    assert state(b) == OPEN and b.trips == 1
    assert not b.available() and not b.acquire()


def test_failure_ratio_over_the_window_opens_it_once_there_are_min_calls() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=100, failure_ratio=0.5, min_calls=20, window_s=10)
    for _ in range(9):  # alternate: never two failures in a row, 50 % failures
        succeed(b, 1)
        fail(b, 1)
        clock.advance(0.5)
    assert state(b) == CLOSED  # 18 calls: below min_calls
    succeed(b, 1)
    fail(b, 1)
    assert state(b) == OPEN  # 20 calls, 10 failed


def test_failures_older_than_the_window_do_not_count() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=100, failure_ratio=0.5, min_calls=20, window_s=10)
    for _ in range(10):
        succeed(b, 1)
        fail(b, 1)
    assert state(b) == OPEN  # the same calls within one window do open it
    b2 = breaker(clock, consecutive_failures=100, failure_ratio=0.5, min_calls=20, window_s=10)
    fail(b2, 1)
    succeed(b2, 1)
    fail(b2, 8)  # 10 calls, 9 failed: below min_calls
    clock.advance(11)  # all of them leave the window
    succeed(b2, 12)
    fail(b2, 8)  # 20 calls in the window, 8 failed: 40 %
    assert state(b2) == CLOSED


def test_slow_calls_in_a_row_open_it() -> None:
    clock = FakeClock()
    b = breaker(clock, slow_calls=5)
    succeed(b, 4, slow=True)
    succeed(b, 1, slow=False)  # breaks the streak
    succeed(b, 4, slow=True)
    assert state(b) == CLOSED
    succeed(b, 1, slow=True)
    assert state(b) == OPEN


def test_open_lets_nothing_through_until_open_s_then_a_few_probes() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=1, open_s=5, half_open_probes=2)
    fail(b, 1)
    clock.advance(4.9)
    assert not b.acquire() and b.retry_after() > 0
    clock.advance(0.1)
    assert b.available() and b.retry_after() == 0
    assert b.acquire() and state(b) == HALF_OPEN
    assert b.acquire()
    assert not b.acquire() and not b.available()  # two probes out: no third
    b.success()
    assert state(b) == HALF_OPEN
    b.success()
    assert state(b) == CLOSED and b.acquire()


def test_a_failed_probe_opens_it_again_for_open_s() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=1, open_s=5, half_open_probes=3)
    fail(b, 1)
    clock.advance(5)
    assert b.acquire()
    b.failure()
    assert state(b) == OPEN and b.trips == 2
    clock.advance(4)
    assert not b.acquire()
    clock.advance(1)
    assert b.acquire()


def test_a_slow_probe_opens_it_again() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=1, open_s=1, half_open_probes=1)
    fail(b, 1)
    clock.advance(1)
    assert b.acquire()
    b.success(slow=True)
    assert state(b) == OPEN


def test_a_released_probe_frees_its_slot_without_a_verdict() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=1, open_s=1, half_open_probes=1)
    fail(b, 1)
    clock.advance(1)
    assert b.acquire()
    assert not b.acquire()
    b.release()  # the client left
    assert state(b) == HALF_OPEN and b.acquire()


def test_outcomes_of_calls_let_through_before_it_opened_are_ignored() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=2, open_s=5)
    assert b.acquire() and b.acquire() and b.acquire()  # three calls in flight
    b.failure()
    b.failure()
    assert state(b) == OPEN
    b.success()  # the third ends after it opened: no effect
    b.failure()
    assert state(b) == OPEN and b.trips == 1


def test_open_until_keeps_it_open_as_long_as_the_other_sidecar_says() -> None:
    clock = FakeClock()
    b = breaker(clock, open_s=5)
    b.open_until(clock.now() - 1)  # already over: nothing
    assert state(b) == CLOSED
    b.open_until(clock.now() + 3)
    assert state(b) == OPEN and b.trips == 0  # not a trip of this sidecar's
    assert b.retry_after() == 3
    b.open_until(clock.now() + 1)  # a shorter one does not cut it short
    assert b.retry_after() == 3
    clock.advance(3)
    assert b.acquire() and state(b) == HALF_OPEN


def test_open_until_reopens_a_half_open_breaker() -> None:
    clock = FakeClock()
    b = breaker(clock, consecutive_failures=1, open_s=1)
    fail(b, 1)
    clock.advance(1)
    assert b.acquire()
    b.open_until(clock.now() + 10)
    assert not b.acquire() and b.retry_after() == 10
    b.success()  # the probe let through before: no news
    assert state(b) == OPEN
