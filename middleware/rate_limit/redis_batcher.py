"""Script calls to Redis, batched: everything asked in one event-loop iteration leaves as one write
and comes back as one read, under one deadline.

Hot-path economy: a call is bytes already in RESP form (the constant part of each bucket's command
is encoded once, see ``command``), written with the connection's ``send_packed_command`` and read
back with its ``read_response`` (redis-py's own connection and parser), so no command packing or
pipeline bookkeeping runs per request. Settlements of the same bucket are merged into one call
(their token differences summed, their in-flight members listed), and wait up to SETTLE_DELAY_S
for the next admission to ride along with (ahead of it): a request then costs one round trip,
not two, even when requests come one at a time. While Redis is unreachable, settlements wait
(bounded) and go out when it answers again, so in-flight slots are not left taken by a blip.

A script Redis does not know (NOSCRIPT: a restarted or flushed server) is loaded and the calls
sent again. Nothing is retried otherwise: a call may have run although its answer was lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

from redis.asyncio import ConnectionPool, Redis
from redis.exceptions import NoScriptError, RedisError, ResponseError

from middleware.rate_limit import lua

log = logging.getLogger("llm_sidecar.rate_limit")

Undo = Callable[[Any], None]
Outcome = Callable[[BaseException | None, int], None]  # (None: it worked, else why not; calls)
# A merged settlement lists at most this many in-flight members; more start a new call.
MAX_MEMBERS: Final = 512
SETTLE_DELAY_S: Final = 0.005
# Buckets whose settlements may wait (while Redis is unreachable) before more are dropped.
MAX_HELD: Final = 10_000


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def command_head(keys: Sequence[bytes], args: Sequence[bytes]) -> bytes:
    """The constant start of an EVALSHA of the script: sha, keys and the first arguments."""
    return b"".join(
        [bulk(b"EVALSHA"), bulk(lua.SHA.encode()), bulk(b"%d" % len(keys))]
        + [bulk(x) for x in (*keys, *args)]
    )


def command(head: bytes, head_items: int, tail: Sequence[bytes]) -> bytes:
    """A complete RESP command: ``head`` (``head_items`` elements) followed by ``tail``."""
    return b"*%d\r\n%b%b" % (head_items + len(tail), head, b"".join(bulk(x) for x in tail))


class StoreUnavailable(Exception):
    """Redis did not answer in time, or not at all."""


SettleKey = tuple[bytes, int, bytes]  # (command head, its items, now)


class _Settle:
    """Settlements of one bucket, merged: a token difference and the in-flight members to free."""

    __slots__ = ("amount", "members")

    def __init__(self) -> None:
        self.amount = 0
        self.members: list[bytes] = []


# One command of a round trip: its bytes, who waits for its reply (admissions), what to do when
# that one has left, and for a settlement its bucket and members (re-queued if the trip fails).
_Call = tuple[bytes, "asyncio.Future[Any] | None", Undo | None, tuple[SettleKey, list[bytes]] | None]


class ScriptBatcher:
    def __init__(self, client: Redis, pool: ConnectionPool, timeout_s: float, on_outcome: Outcome) -> None:
        self.client = client
        self.pool = pool
        self.timeout_s = timeout_s
        self.on_outcome = on_outcome
        self.hold = False  # Redis is unreachable (the breaker is open): keep settlements for later
        self._calls: list[_Call] = []
        self._settles: dict[SettleKey, _Settle] = {}
        self._soon = False  # a flush is due in this loop iteration
        self._later: asyncio.TimerHandle | None = None  # a flush of settlements only, a little later
        self._tasks: set[asyncio.Task[None]] = set()  # round trips under way (awaited by drain)

    def call(self, data: bytes, waiter: asyncio.Future[Any], undo: Undo | None = None) -> None:
        """Queue one command; ``waiter`` gets its reply, or ``undo`` does instead when the waiter
        was cancelled meanwhile (its caller left, but Redis did the work)."""
        self._calls.append((data, waiter, undo, None))
        if not self._soon:
            self._soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def settle(self, key: SettleKey, amount: int, member: bytes) -> None:
        """Queue a settlement of the bucket ``key`` names, merged with the others queued for it."""
        entry = self._settles.get(key)
        if entry is None:
            if len(self._settles) >= MAX_HELD:
                log.error("rate_limit: %d buckets' settlements wait for Redis; dropping more", MAX_HELD)
                return
            entry = self._settles[key] = _Settle()
        elif len(entry.members) >= MAX_MEMBERS:
            self._calls.append(self._settle_call(key, entry))
            entry = self._settles[key] = _Settle()
        entry.amount += amount
        if member:
            entry.members.append(member)
        self.wake()

    def wake(self) -> None:
        """Send the queued settlements soon (unless Redis is being skipped)."""
        if self._settles and not self.hold and not self._soon and self._later is None:
            self._later = asyncio.get_running_loop().call_later(SETTLE_DELAY_S, self._flush)

    @staticmethod
    def _settle_call(key: SettleKey, entry: _Settle) -> _Call:
        head, items, now = key
        data = command(head, items, [now, b"%d" % entry.amount, *entry.members])
        return (data, None, None, (key, entry.members))

    def _flush(self) -> None:
        self._soon = False
        if self._later is not None:
            self._later.cancel()
            self._later = None
        # Settlements first: they were (mostly) asked for before the admissions queued with them.
        batch = [self._settle_call(key, entry) for key, entry in self._settles.items()]
        self._settles.clear()
        batch += self._calls
        self._calls = []
        if batch:
            task = asyncio.get_running_loop().create_task(self._round_trip(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _round_trip(self, batch: list[_Call]) -> None:
        try:
            async with asyncio.timeout(self.timeout_s):
                replies = await self._exchange([call[0] for call in batch])
                missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
                if missing:
                    await self.client.script_load(lua.SCRIPT)
                    again = await self._exchange([batch[i][0] for i in missing])
                    for i, reply in zip(missing, again, strict=True):
                        replies[i] = reply
        except (RedisError, OSError, TimeoutError) as e:
            self.on_outcome(e, len(batch))
            for _, waiter, _, settled in batch:
                if waiter is not None and not waiter.done():
                    waiter.set_exception(StoreUnavailable(f"{type(e).__name__}: {e}"))
                elif settled is not None:
                    self._requeue(*settled)
            return
        self.on_outcome(None, len(batch))
        for (_, waiter, undo, _), reply in zip(batch, replies, strict=True):
            if waiter is None:
                if isinstance(reply, Exception):
                    log.error("rate_limit: a settlement failed in Redis: %s", reply)
            elif waiter.cancelled():
                if undo is not None and not isinstance(reply, Exception):
                    undo(reply)
            elif isinstance(reply, Exception):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)

    def _requeue(self, key: SettleKey, members: list[bytes]) -> None:
        """A settlement that may not have reached Redis: its in-flight members are sent again
        (freeing a slot twice is harmless; leaving it taken would block its key until the lease
        ends). Its token difference is not: had it run, sending it again would count it twice."""
        for member in members:
            self.settle(key, 0, member)

    async def _exchange(self, commands: list[bytes]) -> list[Any]:
        """Write ``commands`` at once on one pooled connection; read their replies in order."""
        conn = await self.pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await conn.send_packed_command(commands, check_health=False)
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as e:  # an error reply; the connection is still in step
                    replies.append(e)
            return replies
        except BaseException:
            await conn.disconnect(nowait=True)  # replies may be left unread: never reuse it
            raise
        finally:
            await self.pool.release(conn)

    async def drain(self) -> None:
        """Send what is queued and wait (a bounded time) for the round trips under way."""
        self._flush()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.timeout_s * 2)
