"""The seam between the middleware and where bucket state lives (memory.py, redis_backend.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from middleware.rate_limit.bucket import Decision, LimitSpec


@dataclass(slots=True)  # not frozen: one per request, built cheaply (see bucket.Decision)
class Ask:
    """One request's claim: a request and ``tokens`` from the buckets of (scope, model)."""

    scope: str  # the tenant or the key id (config ``per``)
    model: str  # the route name ("-" when the request names none)
    key_id: str  # whose in-flight slots
    spec: LimitSpec
    tokens: int  # reserved: estimated prompt + max completion


@dataclass(slots=True)
class Ticket:
    """What acquire() answered; give it back to release() exactly once when admitted."""

    ask: Ask
    decision: Decision | None  # None: the store was unreachable and the request let through unchecked
    handle: Any = None  # the backend's own (its in-flight slot)


class Backend(Protocol):
    async def acquire(self, ask: Ask) -> Ticket:
        """Admit or refuse ``ask`` (``ticket.decision``); an admitted one holds its tokens and slot."""
        ...

    def release(self, ticket: Ticket, used_tokens: int) -> None:
        """The request is over: settle its tokens with what it really used, free its slot.
        Never blocks: a remote store is updated in the background."""
        ...

    async def aclose(self) -> None: ...
