"""The allowance's bookkeeping (middleware/rate_limit/allowance.py), pure: sizing what to take
ahead, booking the script's replies, reusing in-flight members."""

from __future__ import annotations

from middleware.rate_limit import lua
from middleware.rate_limit.allowance import Allowance, Slots
from middleware.rate_limit.bucket import LimitSpec, Rate

SPEC = LimitSpec(requests=Rate(600, 600.0), tokens=Rate(60_000, 60_000.0), max_in_flight=4)


def allowance(spec: LimitSpec = SPEC) -> Allowance:
    return Allowance(("acme", "m", "k1", spec), b"take", b"give", now=100.0)


def admitted(a: Allowance, count: int, tokens: int) -> None:
    a.count += count
    a.reserved += tokens


def test_nothing_ahead_without_demand_or_without_lease() -> None:
    a = allowance()
    assert a.wants(100.5, 0.1) == (0, 0)
    admitted(a, 10, 100)
    assert a.wants(101.0, 0.0) == (0, 0)


def test_a_steady_load_asks_for_lease_ms_of_it() -> None:
    a = allowance()
    admitted(a, 50, 5000)  # 50 requests in 0.5 s: 100/s
    assert a.wants(100.5, 0.1) == (10, 1000)


def test_an_amount_that_lasted_less_than_lease_ms_doubles() -> None:
    a = allowance()
    admitted(a, 4, 40)
    assert a.wants(100.01, 0.1) == (8, 80)
    admitted(a, 8, 80)
    assert a.wants(100.02, 0.1) == (16, 160)


def test_refunds_lower_the_tokens_wanted_and_unlimited_buckets_want_nothing() -> None:
    a = allowance()
    admitted(a, 10, 10_000)
    a.reserved -= 9_000  # settled: 9000 of the reserved came back
    assert a.wants(101.0, 0.1) == (1, 100)
    b = allowance(LimitSpec(requests=None, tokens=None, max_in_flight=4))
    admitted(b, 10, 0)
    assert b.wants(101.0, 0.1) == (0, 0)


def test_a_reply_is_booked_and_sets_the_top_up_marks() -> None:
    a = allowance()
    a.requests, a.tokens = 1, 50
    decision = a.book(lua.REPLY.pack(0, 500, 10_000, 40_000, 20_000, 0, 40, 4000, 0))
    assert (a.requests, a.tokens, a.low_r, a.low_t) == (41, 4050, 20, 2000)
    assert decision.allowed and decision.requests_remaining == 541 and decision.tokens_remaining == 44_050
    refused = a.book(lua.REPLY.pack(1, 0, 60_000, 0, 60_000, 250, 0, 0, 0))
    assert not refused.allowed and refused.reason == "requests" and refused.retry_after_s == 0.25
    assert (a.low_r, a.low_t) == (20, 2000)  # nothing handed out: the marks stay


def test_members_near_their_expiry_are_not_reused() -> None:
    slots, stale = Slots(100.0), list[bytes]()
    slots.free = [(b"old", 0.0, 99.0), (b"new", 99.0, 99.5)]
    assert slots.free_member(100.0, 50.0, stale) == (b"new", 99.0)
    assert slots.free_member(100.0, 50.0, stale) == (b"", 0.0)
    assert stale == [b"old"]


def test_freed_slots_are_kept_only_far_from_the_limit() -> None:
    """An eighth of the key's room at most (as the script counted its slots): none up to 8."""
    slots = Slots(100.0)

    def kept(registered: int, limit: int) -> int:
        slots.seen(registered, limit)
        return slots.keep

    assert [kept(1, limit) for limit in (1, 2, 8, 9, 17, 32)] == [0, 0, 0, 1, 2, 3]
    slots.seen(30, 32)
    assert slots.keep == 0
    a = Allowance(("acme", "m", "k1", SPEC), b"take", b"give", 100.0, slots)  # max_in_flight 4
    a.book(lua.REPLY.pack(0, 500, 10_000, 40_000, 20_000, 0, 0, 0, 1))
    assert slots.keep == 0  # 3 left below the limit of 4: none kept
    big = LimitSpec(requests=None, tokens=None, max_in_flight=100)
    Allowance(("acme", "m", "k1", big), b"take", b"give", 100.0, slots).book(
        lua.REPLY.pack(0, 0, 0, 0, 0, 0, 0, 0, 20)
    )
    assert slots.keep == 10
