"""The process's bounded group of background tasks: work a middleware starts and does not await
(shadow calls, cache writes, index replication), owned so that none is fire-and-forget.

``spawn(coro, name)`` runs ``coro`` as a task and keeps a strong reference to it until it ends
(the loop itself keeps only a weak one: an unreferenced task can vanish mid-way). When
``max_tasks`` are running it refuses: the coroutine is closed unstarted, the refusal counted, and
``spawn`` returns False — background work is the first to give way under load, never a queue that
grows. A task that raises is logged with its name and traceback and counted (never lost silently).
``drain(timeout_s)`` (App.stop, after the front's drain) waits for what runs, then cancels and
logs what is left; the group refuses new work from then on.

App owns one for the process (it outlives reloads) and hands it to every middleware as
``BuildContext.tasks``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from proxy.metrics import MetricsScope

log = logging.getLogger("llm_sidecar.tasks")

# Background work per request (a shadow copy, a cache write) finishes in a request's time; 1024 at
# once is a backlog of seconds at thousands of requests per second, and bounds the memory held
# (each task holds its coroutine's frame and whatever it captured: a request body, an answer).
MAX_BACKGROUND_TASKS = 1024


class BackgroundTasks:
    def __init__(self, scope: MetricsScope, max_tasks: int = MAX_BACKGROUND_TASKS) -> None:
        if max_tasks < 1:
            raise ValueError(f"a task group needs max_tasks ≥ 1, got {max_tasks}")
        self.max_tasks = max_tasks
        self._running: dict[asyncio.Task[Any], str] = {}  # task → its name (the strong reference)
        self._closed = False
        self._spawned = scope.counter(
            "background_tasks_spawned", "Background tasks started (shadow calls, cache writes…)", ["name"]
        )
        self._dropped = scope.counter(
            "background_tasks_dropped",
            "Background tasks refused: max_tasks were running, or the sidecar was stopping",
            ["name"],
        )
        self._failed = scope.counter(
            "background_tasks_failed", "Background tasks that ended with an exception (logged)", ["name"]
        )
        self._cancelled = scope.counter(
            "background_tasks_cancelled", "Background tasks still running when the drain ran out", ["name"]
        )

    def __len__(self) -> int:
        return len(self._running)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> bool:
        """Run ``coro`` in the background; False (and ``coro`` closed, never run) when the group is
        full or draining. ``name`` labels its counters and log lines: keep it a constant per kind
        of work (e.g. "shadow"), not per request."""
        key = (name,)
        if self._closed or len(self._running) >= self.max_tasks:
            coro.close()  # never started: no "coroutine was never awaited" warning
            self._dropped.inc(key)
            return False
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._running[task] = name
        task.add_done_callback(self._done)
        self._spawned.inc(key)
        return True

    def _done(self, task: asyncio.Task[Any]) -> None:
        name = self._running.pop(task, "?")
        if task.cancelled():
            return  # counted and logged by drain(), the only one that cancels
        exc = task.exception()
        if exc is not None:
            self._failed.inc((name,))
            log.error("background task %s failed", name, exc_info=exc)

    async def drain(self, timeout_s: float) -> None:
        """Refuse new tasks; wait up to ``timeout_s`` for the running ones, then cancel the rest
        (each logged) and wait for them to unwind."""
        self._closed = True
        if not self._running:
            return
        log.info("waiting up to %g s for %d background task(s)", timeout_s, len(self._running))
        _, pending = await asyncio.wait(list(self._running), timeout=timeout_s)
        if not pending:
            return
        names: dict[str, int] = {}
        for task in pending:
            name = self._running.get(task, "?")
            names[name] = names.get(name, 0) + 1
            self._cancelled.inc((name,))
            task.cancel()
        shown = ", ".join(f"{n} × {count}" for n, count in sorted(names.items()))
        log.warning(
            "cancelled %d background task(s) still running after %g s: %s", len(pending), timeout_s, shown
        )
        # Cancelled tasks may run cleanup (finally:, aclose); bounded too, a task may ignore the cancel.
        await asyncio.wait(pending, timeout=1.0)
