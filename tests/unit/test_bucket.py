"""The pure token-bucket math (middleware/rate_limit/bucket.py), driven by a fake clock."""

from __future__ import annotations

import math

import pytest

from middleware.rate_limit.bucket import (
    IN_FLIGHT_RETRY_S,
    LimitSpec,
    PairState,
    Rate,
    admit,
    seconds_to_full,
    settle,
)
from proxy.clock import FakeClock

# 60 requests/min (1/s) with a bucket of 3; 600 tokens/min (10/s) with a bucket of 100.
SPEC = LimitSpec(requests=Rate(60, 3.0), tokens=Rate(600, 100.0), max_in_flight=0)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_a_new_bucket_is_full_and_admits_a_burst_up_to_its_size(clock: FakeClock) -> None:
    state = PairState(SPEC, clock.now())
    remaining = [admit(state, SPEC, 10, clock.now()).requests_remaining for _ in range(3)]
    assert remaining == [2, 1, 0]
    refused = admit(state, SPEC, 10, clock.now())
    assert (refused.allowed, refused.reason) == (False, "requests")
    assert refused.retry_after_s == pytest.approx(1.0)  # one request refills in 1 s
    assert refused.tokens_remaining == 70  # a refused request takes nothing


def test_refill_is_continuous_and_capped_at_the_bucket_size(clock: FakeClock) -> None:
    state = PairState(SPEC, clock.now())
    for _ in range(3):
        admit(state, SPEC, 0, clock.now())
    clock.advance(0.5)
    half = admit(state, SPEC, 0, clock.now())
    assert not half.allowed and half.retry_after_s == pytest.approx(0.5)
    clock.advance(0.5)
    assert admit(state, SPEC, 0, clock.now()).allowed
    clock.advance(3600)  # an hour idle refills to the bucket size, not beyond
    decisions = [admit(state, SPEC, 0, clock.now()) for _ in range(4)]
    assert [d.allowed for d in decisions] == [True, True, True, False]


def test_a_request_takes_both_buckets_or_neither(clock: FakeClock) -> None:
    state = PairState(SPEC, clock.now())
    assert admit(state, SPEC, 80, clock.now()).allowed
    refused = admit(state, SPEC, 30, clock.now())  # 20 tokens left, 30 asked
    assert (refused.allowed, refused.reason) == (False, "tokens")
    assert refused.retry_after_s == pytest.approx(1.0)  # 10 tokens at 10/s
    assert refused.requests_remaining == 2  # the request was not taken either
    assert state.tokens == pytest.approx(20)


def test_the_longer_wait_names_the_reason(clock: FakeClock) -> None:
    state = PairState(SPEC, clock.now())
    for _ in range(3):
        admit(state, SPEC, 30, clock.now())  # 0 requests, 10 tokens left
    refused = admit(state, SPEC, 60, clock.now())  # requests: 1 s; tokens: 5 s
    assert refused.reason == "tokens"
    assert refused.retry_after_s == pytest.approx(5.0)
    clock.advance(5)
    assert admit(state, SPEC, 60, clock.now()).allowed


def test_a_request_larger_than_the_bucket_can_never_pass(clock: FakeClock) -> None:
    state = PairState(SPEC, clock.now())
    refused = admit(state, SPEC, 101, clock.now())
    assert (refused.allowed, refused.reason, refused.retry_after_s) == (False, "too_large", math.inf)
    assert admit(state, SPEC, 100, clock.now()).allowed


def test_settling_refunds_unused_tokens_capped_at_the_bucket_size(clock: FakeClock) -> None:
    state = PairState(SPEC, clock.now())
    assert admit(state, SPEC, 90, clock.now()).tokens_remaining == 10
    settle(state, SPEC, 25 - 90, clock.now())  # used 25 of the 90 reserved
    assert state.tokens == pytest.approx(75)
    settle(state, SPEC, -1000, clock.now())  # a refund never overfills
    assert state.tokens == pytest.approx(100)


def test_settling_charges_overuse_into_debt_that_later_requests_wait_for(clock: FakeClock) -> None:
    state = PairState(SPEC, clock.now())
    admit(state, SPEC, 50, clock.now())
    settle(state, SPEC, 130 - 50, clock.now())  # used 130 with 50 reserved: 30 below zero
    assert state.tokens == pytest.approx(-30)
    refused = admit(state, SPEC, 10, clock.now())
    assert (refused.reason, refused.tokens_remaining) == ("tokens", 0)
    assert refused.retry_after_s == pytest.approx(4.0)
    clock.advance(4)
    assert admit(state, SPEC, 10, clock.now()).allowed


def test_a_clock_stepping_back_refills_nothing_until_it_passes_the_last_update(clock: FakeClock) -> None:
    state = PairState(SPEC, clock.now())
    for _ in range(3):
        admit(state, SPEC, 0, clock.now())
    clock.advance(-10)  # e.g. a Redis failover to a server whose clock is behind
    assert not admit(state, SPEC, 0, clock.now()).allowed
    assert state.updated == pytest.approx(1000.0)  # not moved back
    clock.advance(10.5)  # half a second after the last real update
    assert not admit(state, SPEC, 0, clock.now()).allowed
    clock.advance(0.5)
    assert admit(state, SPEC, 0, clock.now()).allowed


def test_a_full_in_flight_count_refuses_without_taking(clock: FakeClock) -> None:
    state = PairState(SPEC, clock.now())
    refused = admit(state, SPEC, 10, clock.now(), in_flight_full=True)
    assert (refused.reason, refused.retry_after_s) == ("in_flight", IN_FLIGHT_RETRY_S)
    assert (state.requests, state.tokens) == (3.0, 100.0)


def test_reset_times_say_when_the_buckets_are_full_again(clock: FakeClock) -> None:
    state = PairState(SPEC, clock.now())
    d = admit(state, SPEC, 40, clock.now())
    assert d.requests_reset_s == pytest.approx(1.0)
    assert d.tokens_reset_s == pytest.approx(4.0)
    assert seconds_to_full(state, SPEC) == pytest.approx(4.0)


def test_unlimited_dimensions_are_not_tracked(clock: FakeClock) -> None:
    only_requests = LimitSpec(requests=Rate(60, 1.0), tokens=None, max_in_flight=0)
    state = PairState(only_requests, clock.now())
    d = admit(state, only_requests, 10**9, clock.now())  # tokens are not limited: any cost
    assert d.allowed and (d.tokens_remaining, d.tokens_reset_s) == (0, 0.0)
    assert not admit(state, only_requests, 0, clock.now()).allowed


def test_a_lowered_limit_caps_what_the_bucket_holds(clock: FakeClock) -> None:
    state = PairState(SPEC, clock.now())
    smaller = LimitSpec(requests=Rate(60, 1.0), tokens=Rate(600, 10.0), max_in_flight=0)
    d = admit(state, smaller, 5, clock.now())
    assert (d.requests_remaining, d.tokens_remaining) == (0, 5)
