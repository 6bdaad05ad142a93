"""``backend: redis``: one limit shared by every sidecar that uses the same Redis.

Each admission and each settlement is one call of the Lua script (lua.py) by its SHA; calls made
in the same event-loop iteration leave together as one pipeline (one write, one read), so under
load the per-request cost of Redis is a fraction of a round trip. A script Redis does not know
(a restarted or flushed server answers NOSCRIPT) is loaded and the calls are sent again.

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
from collections.abc import Callable, Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from middleware.rate_limit import lua
from middleware.rate_limit.backend import Ask, Ticket
from middleware.rate_limit.breaker import CLOSED, Breaker
from middleware.rate_limit.bucket import IN_FLIGHT_RETRY_S, Decision, Reason
from middleware.rate_limit.config import RateLimitConfig
from proxy.clock import Clock
from proxy.errors import RateLimiterUnavailable

log = logging.getLogger("llm_sidecar.rate_limit")

REASONS: Final[tuple[Reason, ...]] = ("", "requests", "tokens", "in_flight", "too_large")
Args = tuple[str | int | float, ...]
Undo = Callable[[Any], None]


class StoreUnavailable(Exception):
    """Redis did not answer in time, or not at all."""


class ScriptBatcher:
    """Runs the script for every call made in one loop iteration as one pipeline, with a deadline."""

    def __init__(
        self, client: Redis, timeout_s: float, on_outcome: Callable[[BaseException | None, int], None]
    ) -> None:
        self.client = client
        self.timeout_s = timeout_s
        self.on_outcome = on_outcome  # (None: it worked, else why not; the calls in the round trip)
        self._pending: list[tuple[Args, asyncio.Future[Any] | None, Undo | None]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # round trips under way (awaited by aclose)

    def submit(self, args: Args, waiter: asyncio.Future[Any] | None = None, undo: Undo | None = None) -> None:
        """Queue one script call. ``waiter`` gets its result; ``undo`` gets it instead when the
        waiter was cancelled meanwhile (the caller left, but Redis did the work)."""
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append((args, waiter, undo))

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._round_trip(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _round_trip(self, batch: list[tuple[Args, asyncio.Future[Any] | None, Undo | None]]) -> None:
        try:
            results = await asyncio.wait_for(self._execute([args for args, _, _ in batch]), self.timeout_s)
        except (RedisError, OSError, TimeoutError) as e:
            self.on_outcome(e, len(batch))
            for _, waiter, _ in batch:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(StoreUnavailable(f"{type(e).__name__}: {e}"))
            return
        self.on_outcome(None, len(batch))
        for (_, waiter, undo), result in zip(batch, results, strict=True):
            if waiter is None:
                if isinstance(result, Exception):
                    log.debug("rate_limit: a settlement failed: %s", result)
            elif waiter.cancelled():
                if undo is not None and not isinstance(result, Exception):
                    undo(result)
            elif isinstance(result, Exception):
                waiter.set_exception(result)
            else:
                waiter.set_result(result)

    async def _execute(self, calls: Sequence[Args]) -> list[Any]:
        results = await self._pipeline(calls)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self.client.script_load(lua.SCRIPT)
            again = await self._pipeline([calls[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _pipeline(self, calls: Sequence[Args]) -> list[Any]:
        pipe = self.client.pipeline(transaction=False)
        for args in calls:
            pipe.execute_command("EVALSHA", lua.SHA, 2, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def drain(self) -> None:
        self._flush()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.timeout_s * 2)


class RedisBackend:
    def __init__(self, config: RateLimitConfig, clock: Clock, now: Callable[[], float] | None = None) -> None:
        rc = config.redis
        timeout_s = rc.timeout_ms / 1000
        self.pool = BlockingConnectionPool.from_url(
            rc.url,
            max_connections=rc.max_connections,
            timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            socket_timeout=max(1.0, 2 * timeout_s),  # a backstop: each round trip has its deadline
            # No retries: a script call may have run even though its answer was lost, so sending it
            # again could take twice. The deadline and the breaker decide instead.
            retry=Retry(NoBackoff(), 0),
        )
        self.client = Redis(connection_pool=self.pool)
        self.batcher = ScriptBatcher(self.client, timeout_s, self._outcome)
        self.breaker = Breaker(rc.breaker_failures, rc.breaker_open_s, clock)
        self.deny = config.on_redis_error == "deny"
        self.prefix = rc.key_prefix
        self.lease_s = rc.in_flight_lease_s
        self._now = now  # tests: a fake clock instead of Redis TIME
        self._members = itertools.count()
        self._instance = os.urandom(6).hex()
        parts = urlsplit(rc.url)
        self._where = f"{parts.hostname or parts.path}:{parts.port or 6379}"

    # -- Backend --------------------------------------------------------------------------------------
    async def acquire(self, ask: Ask) -> Ticket:
        if not self.breaker.allow():
            return self._unreachable(ask)
        member = f"{self._instance}:{next(self._members)}" if ask.spec.max_in_flight else ""
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        args = self._args(ask, "acquire", ask.tokens, member)
        self.batcher.submit(args, waiter, lambda result: self._undo(ask, member, result))
        try:
            result = await waiter
        except StoreUnavailable:
            return self._unreachable(ask)
        except RedisError as e:  # the script itself failed: a bug, or a Redis too old for it
            log.error("rate_limit: the Redis script failed: %s", e)
            return self._unreachable(ask)
        return Ticket(ask, decode(result), member)

    def release(self, ticket: Ticket, used_tokens: int) -> None:
        if ticket.decision is None or self.breaker.state != CLOSED:
            return
        ask = ticket.ask
        extra = used_tokens - ask.tokens if ask.spec.tokens is not None else 0
        if extra or ticket.handle:
            self.batcher.submit(self._args(ask, "settle", extra, ticket.handle))

    async def aclose(self) -> None:
        await self.batcher.drain()
        await self.client.aclose()
        await self.pool.disconnect()

    # -- helpers --------------------------------------------------------------------------------------
    def _args(self, ask: Ask, op: str, amount: int, member: str) -> Args:
        spec = ask.spec
        req, tok = spec.requests, spec.tokens
        tag = f"{self.prefix}{{{ask.scope}}}:"
        return (
            f"{tag}{ask.model}",
            f"{tag}inflight:{ask.key_id}",
            op,
            req.per_minute if req is not None else 0,
            req.capacity if req is not None else 0,
            tok.per_minute if tok is not None else 0,
            tok.capacity if tok is not None else 0,
            amount,
            spec.max_in_flight,
            member,
            self.lease_s,
            f"{self._now():.6f}" if self._now is not None else "",
        )

    def _undo(self, ask: Ask, member: str, result: Any) -> None:
        """An admission whose requester left before hearing of it: give its tokens and slot back."""
        if result[0] == 0:
            self.batcher.submit(self._args(ask, "settle", -ask.tokens, member))

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
            return
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


def decode(result: Sequence[int]) -> Decision:
    code, req_left, req_reset_ms, tok_left, tok_reset_ms, wait_ms = (int(x) for x in result)
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
