"""``backend: redis``: one limit shared by every sidecar that uses the same Redis.

Each admission is one call of the Lua script (lua.py) by its SHA, each settlement too (those of a
bucket merged per event-loop iteration); the calls of one iteration leave together, one write and
one read (redis_batcher.py), so under load a request costs a fraction of a round trip.

Every round trip has a deadline (``redis.timeout_ms``); a failure or a miss counts against the
breaker (breaker.py). While it is open Redis is not called: requests are allowed unchecked or
denied with 503, per ``on_redis_error``, and settlements are dropped. Admission uses the Redis
server's clock (TIME inside the script), so sidecars with drifting clocks still agree.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from middleware.rate_limit import lua
from middleware.rate_limit.backend import Ask, Ticket
from middleware.rate_limit.breaker import CLOSED, Breaker
from middleware.rate_limit.bucket import IN_FLIGHT_RETRY_S, Decision, LimitSpec, Reason
from middleware.rate_limit.config import RateLimitConfig
from middleware.rate_limit.redis_batcher import ScriptBatcher, StoreUnavailable, command_head
from middleware.rate_limit.redis_conn import Endpoint
from proxy.clock import Clock
from proxy.errors import RateLimiterUnavailable

log = logging.getLogger("llm_sidecar.rate_limit")

REASONS: Final[tuple[Reason, ...]] = ("", "requests", "tokens", "in_flight", "too_large")
HEAD_ITEMS: Final = 12  # EVALSHA, sha, 2, two keys, seven constant arguments (lua.py)
MAX_HEADS: Final = 4096  # encoded bucket heads kept (then the cache starts over)


class RedisBackend:
    def __init__(self, config: RateLimitConfig, clock: Clock, now: Callable[[], float] | None = None) -> None:
        rc = config.redis
        timeout_s = rc.timeout_ms / 1000
        # No retries: a script call may have run although its answer was lost, so sending it again
        # could take twice. The deadline (connecting included) and the breaker decide instead.
        self.batcher = ScriptBatcher(Endpoint(rc.url), rc.max_connections, timeout_s, self._outcome)
        self.breaker = Breaker(rc.breaker_failures, rc.breaker_open_s, clock)
        self.deny = config.on_redis_error == "deny"
        self.prefix = rc.key_prefix
        self.lease = b"%r" % rc.in_flight_lease_s
        self._now = now  # tests: a fake clock instead of Redis TIME
        self._heads: dict[tuple[str, str, str, LimitSpec], tuple[bytes, bytes]] = {}
        self._members = itertools.count()
        self._instance = os.urandom(6).hex().encode()
        parts = urlsplit(rc.url)
        self._where = f"{parts.hostname or parts.path}:{parts.port or 6379}"

    # -- Backend --------------------------------------------------------------------------------------
    async def acquire(self, ask: Ask) -> Ticket:
        if not self.breaker.allow():
            return self._unreachable(ask)
        heads = self._heads.get((ask.scope, ask.model, ask.key_id, ask.spec))
        acquire_head, settle_head = heads if heads is not None else self._bucket_heads(ask)
        tokens = b"%d" % ask.tokens
        now = self._now_arg() if self._now is not None else b""
        if ask.spec.max_in_flight:
            member = b"%b:%d" % (self._instance, next(self._members))
            data = b"*%d\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
                HEAD_ITEMS + 3,
                acquire_head,
                len(now),
                now,
                len(tokens),
                tokens,
                len(member),
                member,
            )
        else:
            member = b""
            data = b"*%d\r\n%b$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
                HEAD_ITEMS + 2,
                acquire_head,
                len(now),
                now,
                len(tokens),
                tokens,
            )
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.batcher.call(data, waiter, lambda reply: self._give_back(settle_head, ask.tokens, member, reply))
        try:
            reply = await waiter
        except StoreUnavailable:
            return self._unreachable(ask)
        except RedisError as e:  # the script itself failed: a bug, or a Redis too old for it
            log.error("rate_limit: the Redis script failed: %s", e)
            return self._unreachable(ask)
        return Ticket(ask, decode(reply), (settle_head, member))

    def release(self, ticket: Ticket, used_tokens: int) -> None:
        if ticket.decision is None:
            return
        ask = ticket.ask
        settle_head, member = ticket.handle
        extra = used_tokens - ask.tokens if ask.spec.tokens is not None else 0
        if extra or member:
            self.batcher.settle((settle_head, HEAD_ITEMS, self._now_arg()), extra, member)

    async def aclose(self) -> None:
        await self.batcher.aclose()

    # -- helpers --------------------------------------------------------------------------------------
    def _bucket_heads(self, ask: Ask) -> tuple[bytes, bytes]:
        """The encoded constant part of the acquire and settle commands of ``ask``'s bucket."""
        cache_key = (ask.scope, ask.model, ask.key_id, ask.spec)
        heads = self._heads.get(cache_key)
        if heads is None:
            if len(self._heads) >= MAX_HEADS:
                self._heads.clear()
            req, tok = ask.spec.requests, ask.spec.tokens
            tag = f"{self.prefix}{{{ask.scope}}}:"
            keys = (f"{tag}{ask.model}".encode(), f"{tag}inflight:{ask.key_id}".encode())
            constants = (
                b"%d" % (req.per_minute if req is not None else 0),
                b"%r" % (req.capacity if req is not None else 0.0),
                b"%d" % (tok.per_minute if tok is not None else 0),
                b"%r" % (tok.capacity if tok is not None else 0.0),
                b"%d" % ask.spec.max_in_flight,
                self.lease,
            )
            heads = (
                command_head(keys, (b"acquire", *constants)),
                command_head(keys, (b"settle", *constants)),
            )
            self._heads[cache_key] = heads
        return heads

    def _now_arg(self) -> bytes:
        return b"" if self._now is None else b"%.6f" % self._now()

    def _give_back(self, settle_head: bytes, tokens: int, member: bytes, reply: Any) -> None:
        """An admission whose requester left before hearing of it: give its tokens and slot back."""
        if isinstance(reply, bytes) and len(reply) == lua.REPLY.size and lua.REPLY.unpack(reply)[0] == 0:
            self.batcher.settle((settle_head, HEAD_ITEMS, self._now_arg()), -tokens, member)

    def _unreachable(self, ask: Ask) -> Ticket:
        if self.deny:
            raise RateLimiterUnavailable(
                "the rate limiter's shared store is unreachable; try again shortly",
                headers=[(b"retry-after", b"1")],
            )
        return Ticket(ask, None)

    def _outcome(self, error: BaseException | None, calls: int) -> None:
        """Every failed round trip is logged (at most ``breaker_failures`` per ``breaker_open_s``
        while Redis is down: the open breaker stops the calls), and so is the recovery."""
        if error is None:
            if self.breaker.success():
                log.warning("rate_limit: Redis at %s answers again; limits are enforced", self._where)
                self.batcher.hold = False
                self.batcher.wake()  # the settlements held meanwhile
            return
        opened = self.breaker.failure()
        self.batcher.hold = self.breaker.state != CLOSED
        log.warning(
            "rate_limit: Redis at %s failed (%s: %s): %d calls lost, requests %s%s",
            self._where,
            type(error).__name__,
            error or "no answer in time",
            calls,
            "denied (503)" if self.deny else "allowed without limits",
            f"; Redis is skipped for {self.breaker.open_s:g} s" if opened else "",
        )


def decode(reply: bytes) -> Decision:
    code, req_left, req_reset_ms, tok_left, tok_reset_ms, wait_ms = lua.REPLY.unpack(reply)
    wait_s = math.inf if wait_ms < 0 else wait_ms / 1000
    if code == 3:
        wait_s = IN_FLIGHT_RETRY_S
    return Decision(
        allowed=code == 0,
        reason=REASONS[code],
        retry_after_s=wait_s,
        requests_remaining=req_left,
        requests_reset_s=req_reset_ms / 1000,
        tokens_remaining=tok_left,
        tokens_reset_s=tok_reset_ms / 1000,
    )
