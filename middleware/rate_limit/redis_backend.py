"""``backend: redis``: one limit shared by every sidecar that uses the same Redis.

Redis holds each bucket (lua.py, one script called by its SHA, the Redis server's clock). A sidecar
does not ask it per request: with each call it takes some requests and tokens *ahead* (an
:class:`Allowance`, about ``lease_ms`` of its recent demand, never more than an eighth of what the
bucket holds) and admits from them by itself until they run low, when one call tops them up in the
background. Settlements stay in the allowance too: a refund is spent locally, a debt goes to
Redis with the next call. What an allowance holds unused goes back after ``lease_ms`` without
requests (``_flush``). So under load a request costs no round trip, and near its limit a bucket
hands nothing out ahead: every request then asks Redis and the fleet admits the exact budget.

In-flight slots are per key, whatever the model (allowance.Slots, shared by the key's allowances).
A freed slot still registered in Redis would count against the key on every sidecar, so one is
kept for the key's next request here only while the key is far from its limit (an eighth of its
room at most, as Redis last counted it); otherwise it is freed in Redis at once, in a call sent as
the request ends. A client that waits for its answer before sending the next request, to whichever
sidecar, therefore always finds its slot free; and the fleet never has more than the limit in
progress.

Every round trip has a deadline (``redis.timeout_ms``); a failure or a miss counts against the
breaker (breaker.py). While it is open Redis is not called: requests the allowance cannot cover
are allowed unchecked or denied with 503, per ``on_redis_error``, and what the allowances owe
Redis waits for it to answer again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from middleware.rate_limit import lua
from middleware.rate_limit.allowance import Allowance, BucketKey, Slots
from middleware.rate_limit.backend import Ask, Ticket
from middleware.rate_limit.breaker import CLOSED, Breaker
from middleware.rate_limit.config import RateLimitConfig
from middleware.rate_limit.redis_batcher import (
    ScriptBatcher,
    StoreUnavailable,
    command,
    command_head,
    did_not_run,
)
from middleware.rate_limit.redis_conn import Endpoint
from proxy.clock import Clock
from proxy.errors import RateLimiterUnavailable
from proxy.metrics import Counter

log = logging.getLogger("llm_sidecar.rate_limit")

HEAD_ITEMS: Final = 12  # EVALSHA, sha, 2, two keys, op and six constant arguments (lua.py)
MAX_FREED: Final = 1024  # in-flight members one call frees at most (more go with the next)
MIN_FLUSH_S: Final = 0.005  # without lease_ms, settlements still gather this long per call


class RedisBackend:
    def __init__(
        self,
        config: RateLimitConfig,
        clock: Clock,
        now: Callable[[], float] | None = None,
        failures: Counter | None = None,
    ) -> None:
        rc = config.redis
        timeout_s = rc.timeout_ms / 1000
        # No retries: a script call may have run although its answer was lost, so sending it again
        # could take twice. The deadline (connecting included) and the breaker decide instead.
        self.batcher = ScriptBatcher(Endpoint(rc.url), rc.max_connections, timeout_s, self._outcome)
        self.breaker = Breaker(rc.breaker_failures, rc.breaker_open_s, clock)
        self.clock = clock
        self.failures = failures if failures is not None else Counter("redis_failures", "", ("user",))
        self._last_error: tuple[float, str] | None = None  # when and how the last round trip failed
        self.deny = config.on_redis_error == "deny"
        self.prefix = rc.key_prefix
        self.lease = b"%r" % rc.in_flight_lease_s
        self.lease_s = rc.lease_ms / 1000
        self.reuse_s = rc.in_flight_lease_s / 2  # a slot older than this is not reused (it expires)
        self._now = now  # tests: a fake clock instead of Redis TIME
        self._allowances: dict[BucketKey, Allowance] = {}
        self._slots: dict[tuple[str, str], Slots] = {}  # (scope, key id) → its in-flight slots here
        self._timer: asyncio.TimerHandle | None = None
        self._members = itertools.count()
        self._instance = os.urandom(6).hex().encode()
        parts = urlsplit(rc.url)
        self._where = f"{parts.hostname or parts.path}:{parts.port or 6379}"

    # -- Backend --------------------------------------------------------------------------------------
    async def acquire(self, ask: Ask) -> Ticket:
        spec = ask.spec
        a = self._allowances.get((ask.scope, ask.model, ask.key_id, spec))
        if a is None:
            a = self._allowance(ask)
        now = self.clock.now()
        need = ask.tokens
        if (spec.requests is None or a.requests >= 1) and (spec.tokens is None or a.tokens >= need):
            slots = a.slots
            if slots is None:
                return self._admit_here(a, ask, now, b"", 0.0)
            if slots.free:
                member, granted = slots.free_member(now, self.reuse_s, a.to_free)
                if member:
                    return self._admit_here(a, ask, now, member, granted)
        if not self.breaker.allow():
            return self._unreachable(ask)
        return await self._take(a, ask, now)

    def release(self, ticket: Ticket, used_tokens: int) -> None:
        if ticket.decision is None:
            return
        ask = ticket.ask
        a, member, granted = ticket.handle
        if ask.spec.tokens is not None:
            a.tokens -= used_tokens - ask.tokens
            a.reserved += used_tokens - ask.tokens  # the net use: a refund comes back here
        now = self.clock.now()
        if member:
            slots = a.slots
            assert slots is not None  # a member is only handed out with the key's slots
            slots.used_at = now
            if self.lease_s > 0 and len(slots.free) < slots.keep:
                slots.free.append((member, granted, now))  # far from the limit: for the next here
            else:
                a.to_free.append(member)
                if self.breaker.state == CLOSED:  # else with the next call once Redis answers
                    self._free_now(a)
        a.in_use -= 1
        a.used_at = now
        if self._timer is None:
            self._arm()

    async def aclose(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._flush(everything=True)
        await self.batcher.aclose()

    # -- admission ------------------------------------------------------------------------------------
    def _admit_here(self, a: Allowance, ask: Ask, now: float, member: bytes, granted: float) -> Ticket:
        """Admit from what the allowance holds; top it up in the background when it runs low."""
        spec = ask.spec
        if spec.requests is not None:
            a.requests -= 1
        if spec.tokens is not None:
            a.tokens -= ask.tokens
        a.count += 1
        a.reserved += ask.tokens
        a.in_use += 1
        a.used_at = now
        if a.slots is not None:
            a.slots.used_at = now
        if (a.requests < a.low_r or a.tokens < a.low_t) and not a.calling:
            self._top_up(a, now)
        return Ticket(ask, a.local_decision(), (a, member, granted))

    async def _take(self, a: Allowance, ask: Ask, now: float) -> Ticket:
        """Ask Redis to admit the request, giving back what the allowance holds and taking more ahead."""
        slots = a.slots
        reused, granted = b"", 0.0
        if slots is not None:
            slots.used_at = now
            reused, granted = slots.free_member(now, self.reuse_s, a.to_free)
        new = b"%b:%d" % (self._instance, next(self._members)) if slots is not None and not reused else b""
        back_r, back_t, freed = a.requests, a.tokens, a.to_free[:MAX_FREED]
        a.requests = a.tokens = 0
        del a.to_free[:MAX_FREED]
        want_r, want_t = a.wants(now, self.lease_s)
        a.in_use += 1  # so that _flush keeps the allowance meanwhile
        a.used_at = now
        data = self._command(a.take_head, ask.tokens, back_r, back_t, want_r, want_t, new, freed=freed)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.batcher.call(data, waiter, lambda reply: self._orphan(a, ask.tokens, reply))
        try:
            reply = await waiter
        except asyncio.CancelledError:
            self._put_back(a, reused, granted, [new] if new else [])
            raise
        except (StoreUnavailable, RedisError) as e:
            self._put_back(a, reused, granted, freed)  # (given-back amounts may have run: dropped)
            if isinstance(e, RedisError) and not did_not_run(e):  # a bug, or a Redis too old for the script
                log.error("rate_limit: the Redis script failed: %s", e)
            return self._unreachable(ask)
        decision = a.book(reply)
        if not decision.allowed:
            self._put_back(a, reused, granted, [])
            return Ticket(ask, decision)
        a.count += 1
        a.reserved += ask.tokens
        member = reused or new
        return Ticket(ask, decision, (a, member, granted if reused else now))

    def _put_back(self, a: Allowance, reused: bytes, granted: float, freed: list[bytes]) -> None:
        """A take that admitted nothing: its members back where they were."""
        a.in_use -= 1
        if reused and a.slots is not None:
            a.slots.free.append((reused, granted, self.clock.now()))
        a.to_free.extend(freed)  # freeing a member twice (or one never added) is harmless
        if self._timer is None:
            self._arm()

    def _orphan(self, a: Allowance, tokens: int, reply: Any) -> None:
        """A take whose requester left before its answer: keep what it took for the next requests."""
        if isinstance(reply, bytes) and len(reply) == lua.REPLY.size:
            reason, _, _, _, _, _, gr, gt, _ = lua.REPLY.unpack(reply)
            a.requests += gr + (reason == 0)
            a.tokens += gt + (tokens if reason == 0 else 0)
            self._keep(a)

    # -- the background: top-ups, giving back, settling ------------------------------------------------
    def _top_up(self, a: Allowance, now: float) -> None:
        if self.breaker.state != CLOSED:
            return
        want_r, want_t = a.wants(now, self.lease_s)
        if not want_r and not want_t:
            return
        a.calling = True
        self._give(a, 0, 0, want_r, want_t)

    def _give(self, a: Allowance, back_r: int, back_t: int, want_r: int = 0, want_t: int = 0) -> None:
        """One give call: amounts back (or charged), members freed, maybe more taken ahead."""
        freed = a.to_free[:MAX_FREED]
        del a.to_free[:MAX_FREED]
        data = self._command(a.give_head, 0, back_r, back_t, want_r, want_t, b"", freed=freed)
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        waiter.add_done_callback(lambda done: self._given(a, back_t, freed, done))
        self.batcher.call(data, waiter)

    def _free_now(self, a: Allowance) -> None:
        """Free the members ``a`` holds for Redis now (a debt goes with them): a freed slot must be
        free for the key's next request on any sidecar."""
        back_t = min(a.tokens, 0)
        a.tokens -= back_t
        self._give(a, 0, back_t)

    def _given(self, a: Allowance, back_t: int, freed: list[bytes], done: asyncio.Future[Any]) -> None:
        a.calling = False
        error = done.exception() if not done.cancelled() else None
        if error is None and not done.cancelled():
            a.book(done.result())
            return
        a.to_free.extend(freed)  # freeing twice is harmless: again later
        if isinstance(error, RedisError) and did_not_run(error) and back_t < 0:
            a.tokens += back_t  # a charge that did not run is owed still (one that may have run is not)
        self._keep(a)

    def _flush(self, everything: bool = False) -> None:
        """Every lease_ms: give back what allowances idle that long hold (and forget them when no
        request of theirs is in progress); send the debts and stale members of the others."""
        self._timer = None
        if self.breaker.state != CLOSED and not everything:
            if self._allowances:
                self._arm()  # what is owed waits for Redis
            return
        now = self.clock.now()
        idle_since = now - self.lease_s
        stale = now - self.reuse_s
        for key, a in list(self._allowances.items()):
            slots = a.slots
            if slots is not None and slots.free:
                self._sweep(slots, a, everything or slots.used_at <= idle_since, idle_since, stale)
            if everything or a.used_at <= idle_since:
                back_r, back_t = a.requests, a.tokens
                a.requests = a.tokens = 0
                a.low_r = a.low_t = 0
                if back_r or back_t or a.to_free:
                    self._give(a, back_r, back_t)
                if a.in_use == 0 and not a.calling and not a.to_free:
                    self._forget(key, a)
            elif a.tokens < 0 or a.to_free:
                back_t = min(a.tokens, 0)
                a.tokens -= back_t
                self._give(a, 0, back_t)
        if self._allowances:
            self._arm()

    @staticmethod
    def _sweep(slots: Slots, a: Allowance, idle: bool, idle_since: float, stale: float) -> None:
        """Kept slots to free (through ``a``): all when the key is idle here; else those not reused
        for lease_ms (the key's other sidecars may need them) and those about to expire in Redis."""
        free = slots.free
        if idle:
            a.to_free.extend(member for member, _, _ in free)
            free.clear()
        elif free[0][2] <= idle_since or free[0][1] <= stale:
            keep = []
            for entry in free:
                if entry[2] > idle_since and entry[1] > stale:
                    keep.append(entry)
                else:
                    a.to_free.append(entry[0])
            slots.free = keep

    def _forget(self, key: BucketKey, a: Allowance) -> None:
        """An idle allowance with nothing in progress or owed: dropped, and its key's slots with
        the last of that key's allowances."""
        del self._allowances[key]
        slots = a.slots
        if slots is not None:
            slots.refs -= 1
            if slots.refs <= 0 and self._slots.get((key[0], key[2])) is slots:
                del self._slots[(key[0], key[2])]
                a.to_free.extend(member for member, _, _ in slots.free)  # (idle: none left)
                slots.free.clear()
                if a.to_free:
                    self._keep(a)

    def _attach(self, a: Allowance) -> None:
        """``a`` shares its key's slots (the first allowance of a key brings them)."""
        mine = a.slots
        if mine is None:
            return
        key = (a.key[0], a.key[2])
        slots = self._slots.setdefault(key, mine)
        if slots is not mine:
            slots.free.extend(mine.free)
            mine.free = []
            a.slots = slots
        slots.refs += 1

    def _arm(self) -> None:
        self._timer = asyncio.get_running_loop().call_later(max(self.lease_s, MIN_FLUSH_S), self._flush)

    # -- helpers --------------------------------------------------------------------------------------
    def _allowance(self, ask: Ask) -> Allowance:
        """A new allowance for ``ask``'s bucket, with the encoded constant part of its commands."""
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
        key = (ask.scope, ask.model, ask.key_id, ask.spec)
        take, give = (command_head(keys, (op, *constants)) for op in (b"take", b"give"))
        now = self.clock.now()
        a = Allowance(key, take, give, now, Slots(now) if ask.spec.max_in_flight else None)
        self._attach(a)
        self._allowances[key] = a
        if self._timer is None:
            self._arm()
        return a

    def _keep(self, a: Allowance) -> None:
        """``a`` (maybe already forgotten by _flush) still holds something for Redis: keep it, or hand
        it to the allowance that replaced it."""
        held = self._allowances.get(a.key)
        if held is None:  # forgotten meanwhile: back, with its key's slots
            self._allowances[a.key] = a
            self._attach(a)
        elif held is not a:
            held.to_free.extend(a.to_free)
            held.requests += a.requests
            held.tokens += a.tokens
            a.to_free, a.requests, a.tokens = [], 0, 0
        if self._timer is None:
            self._arm()

    def _command(self, head: bytes, *numbers: int | bytes, freed: list[bytes]) -> bytes:
        """A call of the script: ``numbers`` are ARGV 9-14 (lua.py), ``freed`` the members after."""
        tail = [self._now_arg()] + [n if isinstance(n, bytes) else b"%d" % n for n in numbers]
        return command(head, HEAD_ITEMS, tail + freed)

    def _now_arg(self) -> bytes:
        return b"" if self._now is None else b"%.6f" % self._now()

    def _unreachable(self, ask: Ask) -> Ticket:
        if self.deny:
            raise RateLimiterUnavailable(
                "the rate limiter's shared store is unreachable; try again shortly",
                headers=[(b"retry-after", b"1")],
            )
        return Ticket(ask, None)

    def problems(self) -> list[str]:
        """Not ready while the last round trip failed (an idle sidecar learns it with its next request)."""
        failed = self._last_error
        if failed is None:
            return []
        at, what = failed
        then = "denied (503)" if self.deny else "allowed without limits"
        ago = self.clock.now() - at
        return [
            f"Redis at {self._where}: the last round trip failed {ago:.1f} s ago ({what}); requests {then}"
        ]

    def _outcome(self, error: BaseException | None, calls: int) -> None:
        """Every failed round trip is logged (at most ``breaker_failures`` per ``breaker_open_s``
        while Redis is down: the open breaker stops the calls), and so is the recovery."""
        if error is None:
            self._last_error = None
            if self.breaker.success():
                log.warning("rate_limit: Redis at %s answers again; limits are enforced", self._where)
            return
        what = f"{type(error).__name__}: {error or 'no answer in time'}"
        self._last_error = (self.clock.now(), what)
        self.failures.inc(("rate_limit",))
        opened = self.breaker.failure()
        log.warning(
            "rate_limit: Redis at %s failed (%s: %s): %d calls lost, requests %s%s",
            self._where,
            type(error).__name__,
            error or "no answer in time",
            calls,
            "denied (503)" if self.deny else "allowed without limits",
            f"; Redis is skipped for {self.breaker.open_s:g} s" if opened else "",
        )
