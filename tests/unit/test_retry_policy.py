"""Backoff, retry budget and Retry-After parsing (middleware/retry_policy.py)."""

from __future__ import annotations

import random
from email.utils import formatdate

import pytest

from middleware.retry_policy import Backoff, RetryBudget, retry_after_s
from proxy.http import Headers


def test_full_jitter_stays_under_the_doubling_ceiling_and_the_cap() -> None:
    backoff = Backoff(0.025, 0.25, random.Random(7))
    for retry, ceiling in [(0, 0.025), (1, 0.05), (2, 0.1), (3, 0.2), (4, 0.25), (10, 0.25), (60, 0.25)]:
        waits = [backoff.delay(retry) for _ in range(500)]
        assert all(0 <= w <= ceiling for w in waits)
        assert max(waits) > 0.8 * ceiling and min(waits) < 0.2 * ceiling  # spread over the range


def test_backoff_is_reproducible_with_a_seed() -> None:
    a = Backoff(0.01, 1.0, random.Random(3))
    b = Backoff(0.01, 1.0, random.Random(3))
    assert [a.delay(i) for i in range(8)] == [b.delay(i) for i in range(8)]


@pytest.mark.parametrize(("base", "cap"), [(0.0, 1.0), (-1.0, 1.0), (0.5, 0.1)])
def test_backoff_rejects_bad_parameters(base: float, cap: float) -> None:
    with pytest.raises(ValueError, match="base_s"):
        Backoff(base, cap, random.Random(1))


def test_budget_allows_ratio_of_requests_plus_the_floor() -> None:
    budget = RetryBudget(ratio=0.2, floor=3, window_s=10)
    now = 100.0
    for _ in range(50):
        budget.request(now)
    allowed = sum(budget.try_retry(now) for _ in range(100))
    assert allowed == 3 + 10  # floor + 20 % of 50


def test_budget_floor_lets_a_quiet_sidecar_retry() -> None:
    budget = RetryBudget(ratio=0.2, floor=2, window_s=10)
    budget.request(5.0)
    assert budget.try_retry(5.0) and budget.try_retry(5.0)
    assert not budget.try_retry(5.0)


def test_budget_forgets_what_left_the_window() -> None:
    budget = RetryBudget(ratio=0.0, floor=2, window_s=10)
    assert budget.try_retry(0.0) and budget.try_retry(0.5)
    assert not budget.try_retry(9.9)
    assert budget.try_retry(10.0)  # the retries of second 0 have left the window
    assert budget.try_retry(10.5)
    assert not budget.try_retry(10.6)  # two in the window again


def test_budget_with_zero_ratio_and_floor_never_retries() -> None:
    budget = RetryBudget(ratio=0.0, floor=0, window_s=1)
    budget.request(1.0)
    assert not budget.try_retry(1.0)


def test_retry_after_prefers_milliseconds() -> None:
    headers = Headers([(b"retry-after", b"3"), (b"retry-after-ms", b"250")])
    assert retry_after_s(headers, 0.0) == 0.25


def test_retry_after_in_seconds_and_as_a_date() -> None:
    assert retry_after_s(Headers([(b"retry-after", b"2")]), 0.0) == 2.0
    now = 1_800_000_000.0
    date = formatdate(now + 30, usegmt=True).encode()
    assert retry_after_s(Headers([(b"retry-after", date)]), now) == pytest.approx(30, abs=1)
    past = formatdate(now - 30, usegmt=True).encode()
    assert retry_after_s(Headers([(b"retry-after", past)]), now) == 0.0


@pytest.mark.parametrize("value", [b"soon", b"-1", b"nan", b""])
def test_retry_after_ignores_what_it_cannot_read(value: bytes) -> None:
    assert retry_after_s(Headers([(b"retry-after", value)]), 0.0) is None
    assert retry_after_s(Headers(), 0.0) is None
