"""Script calls to Redis, batched: what was asked while a connection was busy (or in the same
event-loop iteration) leaves as one write and comes back as one read, under one deadline.

The batcher has its own few connections (``redis.max_connections``, redis_conn.py: an asyncio
protocol of ours, RESP parsed by resp.py), each carrying one round trip at a time: calls queue up
meanwhile and all go in its next write, so batches grow with the load by themselves. Hot-path
economy: a call is bytes already in RESP form (the constant part of each bucket's command is encoded
once, see ``command``), written in one write, the replies handed back in one list; no command
packing, pool or pipeline bookkeeping, and no task per call (one per busy connection).

Settlements of the same bucket are merged into one call (their token differences summed, their
in-flight members listed), and wait up to SETTLE_DELAY_S for the next admission to ride along with
(ahead of it): a request then costs one round trip, not two, even when requests come one at a
time. While Redis is unreachable, settlements wait (bounded) and go out when it answers again, so
in-flight slots are not left taken by a blip.

A script Redis does not know (NOSCRIPT: a restarted or flushed server) is loaded and the calls
sent again. A connection found closed by the server when it is used again (Redis restarted while
it was idle) is opened afresh and the batch sent once more. Nothing is retried otherwise: a call
may have run although its answer was lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final

from redis.exceptions import ClusterDownError, NoScriptError, RedisError, TryAgainError

from middleware.rate_limit import lua
from middleware.rate_limit.redis_conn import Endpoint, RedisConnection
from middleware.rate_limit.resp import bulk

log = logging.getLogger("llm_sidecar.rate_limit")

Undo = Callable[[Any], None]
Outcome = Callable[[BaseException | None, int], None]  # (None: it worked, else why not; calls)
# A merged settlement lists at most this many in-flight members; more start a new call.
MAX_MEMBERS: Final = 512
SETTLE_DELAY_S: Final = 0.005
# Error replies of a command Redis did not run but will later (a busy script, a cluster failing
# over): such a settlement is sent again. (LOADING, a restarted server reading its data, fails the
# whole round trip: redis_conn.py raises it as a connection error.)
TRANSIENT: Final = (TryAgainError, ClusterDownError)  # MASTERDOWN is a ClusterDownError
# Buckets whose settlements may wait (while Redis is unreachable) before more are dropped.
MAX_HELD: Final = 10_000


def command_head(keys: Sequence[bytes], args: Sequence[bytes]) -> bytes:
    """The constant start of an EVALSHA of the script: sha, keys and the first arguments."""
    return b"".join(
        [bulk(b"EVALSHA"), bulk(lua.SHA.encode()), bulk(b"%d" % len(keys))]
        + [bulk(x) for x in (*keys, *args)]
    )


def command(head: bytes, head_items: int, tail: Sequence[bytes]) -> bytes:
    """A complete RESP command: ``head`` (``head_items`` elements) followed by ``tail``."""
    return b"*%d\r\n%b%b" % (head_items + len(tail), head, b"".join(bulk(x) for x in tail))


LOAD_SCRIPT: Final = command(b"", 0, [b"SCRIPT", b"LOAD", lua.SCRIPT.encode()])


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
_Call = tuple[bytes, "asyncio.Future[Any] | None", Undo | None, tuple[SettleKey, list[bytes], int] | None]


class ScriptBatcher:
    def __init__(self, endpoint: Endpoint, connections: int, timeout_s: float, on_outcome: Outcome) -> None:
        self.timeout_s = timeout_s
        self.on_outcome = on_outcome
        self.hold = False  # Redis is unreachable (the breaker is open): keep settlements for later
        self._calls: list[_Call] = []
        self._settles: dict[SettleKey, _Settle] = {}
        self._soon = False  # a flush is due in this loop iteration
        self._later: asyncio.TimerHandle | None = None  # a flush of settlements only, a little later
        self._free = [RedisConnection(endpoint) for _ in range(connections)]
        self._tasks: set[asyncio.Task[None]] = set()  # one per busy connection (awaited by drain)

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
        return (data, None, None, (key, entry.members, entry.amount))

    def _flush(self) -> None:
        self._soon = False
        if self._later is not None:
            self._later.cancel()
            self._later = None
        if self._free and (self._calls or self._settles):
            conn = self._free.pop()
            task = asyncio.get_running_loop().create_task(self._carry(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # else every connection is busy: each takes what queued up when its round trip ends

    def _take(self) -> list[_Call]:
        """What is queued. Settlements wait while Redis is skipped, unless they can ride along with
        an admission (the breaker's probe); they go first: they were (mostly) asked for before."""
        batch = []
        if self._calls or not self.hold:
            batch = [self._settle_call(key, entry) for key, entry in self._settles.items()]
            self._settles.clear()
        batch += self._calls
        self._calls = []
        return batch

    async def _carry(self, conn: RedisConnection) -> None:
        """Round trips on ``conn`` while something is queued and Redis answers."""
        try:
            while batch := self._take():
                if not await self._round_trip(conn, batch):
                    # What queued behind a failed round trip fails with it, at once: a request
                    # waits for Redis at most the round trip under way plus its own.
                    behind, self._calls = self._calls, []
                    self._fail(behind, StoreUnavailable("Redis failed the round trip before"), sent=False)
                    break
        finally:
            self._free.append(conn)

    async def _round_trip(self, conn: RedisConnection, batch: list[_Call]) -> bool:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            commands = [call[0] for call in batch]
            # No second try: a connection lost during the trip may have run the batch already, and
            # a lost answer must not take (or refund) twice. One the server closed while idle is
            # dropped as it closes (connection_lost), so the next trip opens a new one.
            replies = await conn.exchange(commands, deadline)
            missing = []
            if conn.errors:  # rare: no scan of the replies otherwise
                missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
            if missing:
                [loaded] = await conn.exchange([LOAD_SCRIPT], deadline)
                if isinstance(loaded, Exception):
                    raise loaded
                again = await conn.exchange([batch[i][0] for i in missing], deadline)
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        except (RedisError, OSError, TimeoutError) as e:
            self.on_outcome(e, len(batch))
            self._fail(batch, StoreUnavailable(f"{type(e).__name__}: {e}"), sent=True)
            return False
        self.on_outcome(None, len(batch))
        for (_, waiter, undo, settled), reply in zip(batch, replies, strict=True):
            if waiter is None:
                if isinstance(reply, Exception) and settled is not None:
                    if isinstance(reply, TRANSIENT) or str(reply).startswith("BUSY"):  # did not run
                        self._requeue(*settled)
                    else:
                        log.error("rate_limit: Redis refused a settlement: %s", reply)
            elif waiter.cancelled():
                if undo is not None and not isinstance(reply, Exception):
                    undo(reply)
            elif isinstance(reply, Exception):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)
        return True

    def _fail(self, batch: list[_Call], error: StoreUnavailable, sent: bool) -> None:
        for _, waiter, _, settled in batch:
            if waiter is not None:
                if not waiter.done():
                    waiter.set_exception(error)
            elif settled is not None:
                key, members, amount = settled
                self._requeue(key, members, 0 if sent else amount)

    def _requeue(self, key: SettleKey, members: list[bytes], amount: int) -> None:
        """A settlement that may not have reached Redis: its in-flight members are sent again
        (freeing a slot twice is harmless; leaving it taken would block its key until the lease
        ends). Its token difference only if it never ran: had it run, it would count twice."""
        if amount:
            self.settle(key, amount, b"")
        for member in members:
            self.settle(key, 0, member)

    async def drain(self) -> None:
        """Send what is queued and wait (a bounded time) for the round trips under way."""
        self._flush()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.timeout_s * 2)

    async def aclose(self) -> None:
        await self.drain()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._later is not None:
            self._later.cancel()
        for conn in self._free:
            conn.disconnect()
