"""The token-bucket math, pure: no I/O, time passed in. The Redis Lua script (lua.py) mirrors it.

A (scope, model) pair has two buckets that refill together: one counts requests, one LLM tokens.
A bucket holds at most ``capacity`` and refills continuously at ``per_second``; a request is
admitted when the requests bucket holds ≥ 1 and the tokens bucket ≥ its reservation, and then takes
both (or neither). When the response ends, the token difference between the real usage and the
reservation is settled: a refund (capped at capacity) or a further charge, which may take the
bucket below zero — tokens really used are never forgiven, later requests wait for them.

Time only moves forward here: a clock that steps back (a Redis failover to a server whose clock is
behind) refills nothing and leaves ``updated`` where it was, until time passes it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final, Literal

Reason = Literal["", "requests", "tokens", "in_flight", "too_large"]
# How long a client turned away for too many requests in flight is told to wait.
IN_FLIGHT_RETRY_S: Final = 1.0


@dataclass(frozen=True, slots=True)
class Rate:
    per_minute: int  # the limit as configured, shown in x-ratelimit-limit-*
    capacity: float  # the bucket size (burst)
    shown: bytes = field(init=False, repr=False, compare=False)  # per_minute as a header value

    def __post_init__(self) -> None:
        object.__setattr__(self, "shown", b"%d" % self.per_minute)  # once, not per response

    @property
    def per_second(self) -> float:
        return self.per_minute / 60.0


@dataclass(frozen=True, slots=True, eq=False)  # compared and hashed by identity: cheap as a dict key
class LimitSpec:
    requests: Rate | None  # None: not limited
    tokens: Rate | None
    max_in_flight: int  # 0: not limited


# Not frozen: one is made per request, and a frozen dataclass's __init__ costs four times as much
# (an object.__setattr__ per field). Nothing changes one after it is made.
@dataclass(slots=True)
class Decision:
    allowed: bool
    reason: Reason  # why not, when not allowed
    retry_after_s: float  # when a retry may succeed (0 when allowed; inf when it never will)
    requests_remaining: int
    requests_reset_s: float  # until the requests bucket is full again
    tokens_remaining: int
    tokens_reset_s: float


class PairState:
    """The two buckets of one (scope, model). A missing state is a full one."""

    __slots__ = ("requests", "tokens", "updated")

    def __init__(self, spec: LimitSpec, now: float) -> None:
        self.requests = spec.requests.capacity if spec.requests is not None else 0.0
        self.tokens = spec.tokens.capacity if spec.tokens is not None else 0.0
        self.updated = now

    def refill(self, spec: LimitSpec, now: float) -> None:
        elapsed = now - self.updated
        if elapsed < 0:
            elapsed = 0.0  # the clock stepped back: wait until it passes `updated` again
        else:
            self.updated = now
        if spec.requests is not None:
            self.requests = min(spec.requests.capacity, self.requests + elapsed * spec.requests.per_second)
        if spec.tokens is not None:
            self.tokens = min(spec.tokens.capacity, self.tokens + elapsed * spec.tokens.per_second)


def admit(state: PairState, spec: LimitSpec, cost: int, now: float, in_flight_full: bool = False) -> Decision:
    """Refill, then take one request and ``cost`` tokens if both buckets (and in-flight) allow."""
    state.refill(spec, now)
    reason: Reason = ""
    wait = 0.0
    req, tok = spec.requests, spec.tokens
    if tok is not None and cost > tok.capacity:
        reason, wait = "too_large", math.inf
    else:
        if req is not None and state.requests < 1:
            reason, wait = "requests", (1 - state.requests) / req.per_second
        if tok is not None and state.tokens < cost:
            tokens_wait = (cost - state.tokens) / tok.per_second
            if tokens_wait > wait:
                reason, wait = "tokens", tokens_wait
        if not reason and in_flight_full:
            reason, wait = "in_flight", IN_FLIGHT_RETRY_S
    if not reason:
        if req is not None:
            state.requests -= 1
        if tok is not None:
            state.tokens -= cost
    return decision(state, spec, reason, wait)


def settle(state: PairState, spec: LimitSpec, extra: int, now: float) -> None:
    """Charge ``extra`` more tokens (negative: refund) once the real usage is known."""
    state.refill(spec, now)
    if spec.tokens is not None:
        state.tokens = min(spec.tokens.capacity, state.tokens - extra)


def decision(state: PairState, spec: LimitSpec, reason: Reason, wait: float) -> Decision:
    req, tok = spec.requests, spec.tokens
    return Decision(
        allowed=not reason,
        reason=reason,
        retry_after_s=wait,
        requests_remaining=max(0, math.floor(state.requests)) if req is not None else 0,
        requests_reset_s=(req.capacity - state.requests) / req.per_second if req is not None else 0.0,
        tokens_remaining=max(0, math.floor(state.tokens)) if tok is not None else 0,
        tokens_reset_s=(tok.capacity - state.tokens) / tok.per_second if tok is not None else 0.0,
    )


def seconds_to_full(state: PairState, spec: LimitSpec) -> float:
    """After this long untouched, the state equals a fresh (full) one and may be forgotten."""
    full = 0.0
    if spec.requests is not None:
        full = max(full, (spec.requests.capacity - state.requests) / spec.requests.per_second)
    if spec.tokens is not None:
        full = max(full, (spec.tokens.capacity - state.tokens) / spec.tokens.per_second)
    return full
