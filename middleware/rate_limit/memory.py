"""``backend: memory``: the buckets of this process, bounded (least recently used dropped)."""

from __future__ import annotations

from cachetools import LRUCache

from middleware.rate_limit.backend import Ask, Ticket
from middleware.rate_limit.bucket import PairState, admit, settle
from proxy.clock import Clock


class MemoryBackend:
    def __init__(self, clock: Clock, max_buckets: int) -> None:
        self.clock = clock
        # A dropped bucket comes back full: keep max_buckets above keys × models in use.
        self._buckets: LRUCache[tuple[str, str], PairState] = LRUCache(max_buckets)
        self._in_flight: dict[str, int] = {}  # key id → requests in progress (0s are removed)

    async def acquire(self, ask: Ask) -> Ticket:
        return self.acquire_now(ask)

    def acquire_now(self, ask: Ask) -> Ticket:
        now = self.clock.now()
        key = (ask.scope, ask.model)
        state = self._buckets.get(key)
        if state is None:
            state = self._buckets[key] = PairState(ask.spec, now)
        limit = ask.spec.max_in_flight
        full = limit > 0 and self._in_flight.get(ask.key_id, 0) >= limit
        decision = admit(state, ask.spec, ask.tokens, now, full)
        holds_slot = decision.allowed and limit > 0
        if holds_slot:
            self._in_flight[ask.key_id] = self._in_flight.get(ask.key_id, 0) + 1
        return Ticket(ask, decision, holds_slot)

    def release(self, ticket: Ticket, used_tokens: int) -> None:
        ask = ticket.ask
        state = self._buckets.get((ask.scope, ask.model))
        if state is not None:
            settle(state, ask.spec, used_tokens - ask.tokens, self.clock.now())
        if ticket.handle:
            left = self._in_flight.get(ask.key_id, 1) - 1
            if left > 0:
                self._in_flight[ask.key_id] = left
            else:
                self._in_flight.pop(ask.key_id, None)

    def in_flight(self, key_id: str) -> int:
        return self._in_flight.get(key_id, 0)

    async def aclose(self) -> None:
        return None
