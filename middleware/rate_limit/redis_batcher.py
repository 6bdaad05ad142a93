"""Script calls to Redis, batched: what was asked while a connection was busy (or in the same
event-loop iteration) leaves as one write and comes back as one read, under one deadline.

The batcher has its own few connections (``redis.max_connections``, redis_conn.py: an asyncio
protocol of ours, RESP parsed by resp.py), each carrying one round trip at a time: calls queue up
meanwhile and all go in its next write, so batches grow with the load by themselves. Hot-path
economy: a call is bytes already in RESP form (the constant part of each bucket's command is encoded
once, see ``command``), written in one write, the replies handed back in one list; no command
packing, pool or pipeline bookkeeping, and no task per call (one per busy connection).

A script Redis does not know (NOSCRIPT: a restarted or flushed server) is loaded and the calls
sent again. A connection found closed by the server when it is used again (Redis restarted while
it was idle) is opened afresh and the batch sent once more. Nothing is retried otherwise: a call
may have run although its answer was lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Final

from redis.exceptions import ClusterDownError, NoScriptError, RedisError, TryAgainError

from middleware.rate_limit import lua
from middleware.rate_limit.redis_conn import Endpoint, RedisConnection
from middleware.rate_limit.resp import bulk

Undo = Callable[[Any], None]
Outcome = Callable[[BaseException | None, int], None]  # (None: it worked, else why not; calls)
# Error replies of a command Redis did not run (a busy script, a cluster failing over): the caller
# may send it again. (LOADING, a restarted server reading its data, fails the whole round trip:
# redis_conn.py raises it as a connection error.)
TRANSIENT: Final = (TryAgainError, ClusterDownError)  # MASTERDOWN is a ClusterDownError


def did_not_run(reply: BaseException) -> bool:
    """Whether an error reply says the command was not run at all."""
    return isinstance(reply, TRANSIENT) or str(reply).startswith("BUSY")


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


# One command of a round trip: its bytes, who waits for its reply, what to do when that one has left.
_Call = tuple[bytes, "asyncio.Future[Any]", Undo | None]


class ScriptBatcher:
    def __init__(self, endpoint: Endpoint, connections: int, timeout_s: float, on_outcome: Outcome) -> None:
        self.timeout_s = timeout_s
        self.on_outcome = on_outcome
        self._calls: list[_Call] = []
        self._soon = False  # a flush is due in this loop iteration
        self._free = [RedisConnection(endpoint) for _ in range(connections)]
        self._tasks: set[asyncio.Task[None]] = set()  # one per busy connection (awaited by drain)

    def call(self, data: bytes, waiter: asyncio.Future[Any], undo: Undo | None = None) -> None:
        """Queue one command; ``waiter`` gets its reply, or ``undo`` does instead when the waiter
        was cancelled meanwhile (its caller left, but Redis did the work)."""
        self._calls.append((data, waiter, undo))
        if not self._soon:
            self._soon = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._soon = False
        if self._free and self._calls:
            conn = self._free.pop()
            task = asyncio.get_running_loop().create_task(self._carry(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # else every connection is busy: each takes what queued up when its round trip ends

    def _take(self) -> list[_Call]:
        batch, self._calls = self._calls, []
        return batch

    async def _carry(self, conn: RedisConnection) -> None:
        """Round trips on ``conn`` while something is queued and Redis answers."""
        try:
            while batch := self._take():
                if not await self._round_trip(conn, batch):
                    # What queued behind a failed round trip fails with it, at once: a request
                    # waits for Redis at most the round trip under way plus its own.
                    behind, self._calls = self._calls, []
                    self._fail(behind, StoreUnavailable("Redis failed the round trip before"))
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
            self._fail(batch, StoreUnavailable(f"{type(e).__name__}: {e}"))
            return False
        self.on_outcome(None, len(batch))
        for (_, waiter, undo), reply in zip(batch, replies, strict=True):
            if waiter.cancelled():
                if undo is not None and not isinstance(reply, Exception):
                    undo(reply)
            elif isinstance(reply, Exception):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)
        return True

    @staticmethod
    def _fail(batch: list[_Call], error: StoreUnavailable) -> None:
        for _, waiter, _ in batch:
            if not waiter.done():
                waiter.set_exception(error)

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
        for conn in self._free:
            conn.disconnect()
