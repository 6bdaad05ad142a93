"""What one sidecar holds of a Redis bucket (redis_backend.py): the bookkeeping, pure, no I/O.

An :class:`Allowance` is the requests and tokens this sidecar took ahead from one (scope, model)
bucket, what it owes Redis (a settlement's charge, in-flight slots to free), and the demand it saw
since its last call, from which the next call's amount ahead is sized (:meth:`Allowance.wants`).
The in-flight slots are the key's, not the bucket's: :class:`Slots`, one per key, shared by the
allowances of all its models, holds the freed slots this sidecar keeps for the key's next request
(only as many as the key's room below its limit allows, :meth:`Slots.seen`).
"""

from __future__ import annotations

import math
from typing import Final

from middleware.rate_limit import lua
from middleware.rate_limit.bucket import IN_FLIGHT_RETRY_S, Decision, LimitSpec, Reason

REASONS: Final[tuple[Reason, ...]] = ("", "requests", "tokens", "in_flight", "too_large")

BucketKey = tuple[str, str, str, LimitSpec]  # (scope, model, key id, spec)


class Slots:
    """The in-flight slots of one key this sidecar registered in Redis and keeps, freed, for the
    key's next request of any model (reused without a round trip).

    A kept slot still counts in Redis, so it could refuse the key's request on another sidecar:
    slots are kept only while the key, as Redis last counted it, is far from its limit — at most an
    eighth (lua.SHARE) of its room, as for what a bucket hands out ahead. A limit up to 8 keeps none:
    every freed slot goes back to Redis at once, and the limit is exact across the fleet."""

    __slots__ = ("free", "keep", "refs", "used_at")

    def __init__(self, now: float) -> None:
        # registered and free: (member, registered at, freed at)
        self.free: list[tuple[bytes, float, float]] = []
        self.keep = 0  # freed slots kept at most (from the key's count at the last reply)
        self.refs = 0  # allowances of this key sharing it
        self.used_at = now  # last admission or release of the key here

    def seen(self, registered: int, limit: int) -> None:
        """Redis counted ``registered`` slots of the key (the fleet's, kept ones included)."""
        self.keep = max(0, math.floor((limit - registered) * lua.SHARE))

    def free_member(self, now: float, reuse_s: float, stale: list[bytes]) -> tuple[bytes, float]:
        """A registered in-flight member to reuse, and when it was registered (b"" when none is
        younger than ``reuse_s``; older ones go to ``stale``, to be freed in Redis)."""
        free = self.free
        while free:
            member, granted, _ = free.pop()
            if now - granted < reuse_s:
                return member, granted
            stale.append(member)  # about to expire in Redis: drop it, register a new one
        return b"", 0.0


class Allowance:
    """What this sidecar holds of one (scope, model) bucket (and which key's slots it uses)."""

    __slots__ = (
        "calling",
        "count",
        "give_head",
        "in_use",
        "key",
        "left_r",
        "left_t",
        "low_r",
        "low_t",
        "requests",
        "reserved",
        "since",
        "slots",
        "spec",
        "take_head",
        "to_free",
        "tokens",
        "used_at",
        "want_r",
        "want_t",
    )

    def __init__(
        self, key: BucketKey, take_head: bytes, give_head: bytes, now: float, slots: Slots | None = None
    ) -> None:
        self.key = key
        self.spec = key[3]
        self.slots = slots  # the key's in-flight slots here (None: no max_in_flight)
        self.take_head = take_head  # the constant start of this bucket's two commands
        self.give_head = give_head
        self.requests = 0  # taken ahead from Redis, not used yet
        self.tokens = 0  # likewise (below zero: settlements' charges Redis has not seen yet)
        self.to_free: list[bytes] = []  # members Redis must drop
        self.in_use = 0  # admitted requests not yet released, and takes under way
        self.used_at = now  # last admission or release
        self.since = now  # last call to Redis
        self.count = 0  # admissions since then
        self.reserved = 0  # tokens used meanwhile: reserved at admission, less refunds since
        self.want_r = 0  # what the last call asked for ahead
        self.want_t = 0
        self.low_r = 0  # top up below these (half of what the last call handed out)
        self.low_t = 0
        self.left_r = 0  # what the bucket held after the last call (for the headers)
        self.left_t = 0
        self.calling = False  # a top-up is under way

    def wants(self, now: float, lease_s: float) -> tuple[int, int]:
        """How much to take ahead: about lease_ms of this allowance's demand (what it admitted since
        its last call, scaled); twice the last amount when that lasted less than lease_ms, so it
        grows quickly to a steady load (the script caps it at an eighth of the bucket)."""
        count, reserved, elapsed = self.count, self.reserved, now - self.since
        self.since, self.count, self.reserved = now, 0, 0
        if lease_s <= 0 or count == 0:
            return 0, 0
        if elapsed >= lease_s:
            scale = lease_s / elapsed
            want_r, want_t = math.ceil(count * scale), math.ceil(max(reserved, 0) * scale)
        else:
            want_r, want_t = 2 * max(count, self.want_r), 2 * max(reserved, self.want_t)
        if self.spec.requests is None:
            want_r = 0
        if self.spec.tokens is None:
            want_t = 0
        self.want_r, self.want_t = want_r, want_t
        return want_r, want_t

    def book(self, reply: bytes) -> Decision:
        """Book a reply of the script (lua.REPLY) into the allowance; the decision it carries."""
        code, req_left, req_reset_ms, tok_left, tok_reset_ms, wait_ms, gr, gt, held = lua.REPLY.unpack(reply)
        if self.slots is not None:
            self.slots.seen(held, self.spec.max_in_flight)
        self.requests += gr
        self.tokens += gt
        if gr or gt:
            self.low_r, self.low_t = gr // 2, gt // 2
        self.left_r, self.left_t = req_left, tok_left
        wait_s = math.inf if wait_ms < 0 else wait_ms / 1000
        if code == 3:
            wait_s = IN_FLIGHT_RETRY_S
        return Decision(
            allowed=code == 0,
            reason=REASONS[code],
            retry_after_s=wait_s,
            requests_remaining=req_left + self.requests,
            requests_reset_s=req_reset_ms / 1000,
            tokens_remaining=tok_left + max(self.tokens, 0),
            tokens_reset_s=tok_reset_ms / 1000,
        )

    def local_decision(self) -> Decision:
        """An admission from the allowance: what this sidecar knows the bucket holds (the rest of the
        fleet's allowances aside)."""
        req, tok = self.spec.requests, self.spec.tokens
        left_r = self.left_r + self.requests
        left_t = self.left_t + (self.tokens if self.tokens > 0 else 0)
        return Decision(
            allowed=True,
            reason="",
            retry_after_s=0.0,
            requests_remaining=left_r,
            requests_reset_s=(req.capacity - left_r) / req.per_second if req is not None else 0.0,
            tokens_remaining=left_t,
            tokens_reset_s=(tok.capacity - left_t) / tok.per_second if tok is not None else 0.0,
        )
