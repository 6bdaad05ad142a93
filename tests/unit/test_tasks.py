"""The bounded background task group (proxy/tasks.py): bound and drops, failures logged and counted,
drain waits then cancels. Real (short) timeouts: the group waits on the loop, not on a clock."""

from __future__ import annotations

import asyncio
import inspect
import logging

import pytest

from proxy.metrics import MetricsScope
from proxy.tasks import BackgroundTasks


def counts(scope: MetricsScope, name: str) -> dict[tuple[str, ...], float]:
    return dict(scope.counters[name].values)


async def test_spawn_runs_the_task_and_keeps_it_until_it_ends() -> None:
    scope = MetricsScope()
    tasks = BackgroundTasks(scope, max_tasks=2)
    done = asyncio.Event()

    async def work() -> None:
        await asyncio.sleep(0)
        done.set()

    assert tasks.spawn(work(), "shadow")
    assert len(tasks) == 1  # held by the group (a strong reference) while it runs
    await asyncio.wait_for(done.wait(), 1)
    await asyncio.sleep(0)
    assert len(tasks) == 0
    assert counts(scope, "background_tasks_spawned") == {("shadow",): 1}


async def test_a_full_group_refuses_and_counts_the_drop_without_running_it() -> None:
    scope = MetricsScope()
    tasks = BackgroundTasks(scope, max_tasks=2)
    gate = asyncio.Event()
    ran: list[int] = []

    async def work(i: int) -> None:
        ran.append(i)
        await gate.wait()

    assert tasks.spawn(work(1), "shadow")
    assert tasks.spawn(work(2), "shadow")
    refused = work(3)
    assert not tasks.spawn(refused, "shadow")
    assert inspect.getcoroutinestate(refused) == inspect.CORO_CLOSED  # never runs, no "never awaited" warning
    assert counts(scope, "background_tasks_dropped") == {("shadow",): 1}
    gate.set()
    await tasks.drain(1.0)
    assert ran == [1, 2]
    assert tasks.spawn(work(4), "late") is False  # drained: refuses from then on
    assert counts(scope, "background_tasks_dropped") == {("shadow",): 1, ("late",): 1}


async def test_a_failing_task_is_logged_with_its_name_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    scope = MetricsScope()
    tasks = BackgroundTasks(scope)

    async def boom() -> None:
        raise RuntimeError("redis went away")

    with caplog.at_level(logging.ERROR, logger="llm_sidecar.tasks"):
        tasks.spawn(boom(), "cache_write")
        await tasks.drain(1.0)
    assert counts(scope, "background_tasks_failed") == {("cache_write",): 1}
    [record] = [r for r in caplog.records if r.name == "llm_sidecar.tasks" and r.levelno == logging.ERROR]
    assert "background task cache_write failed" in record.getMessage()
    assert record.exc_info is not None and "redis went away" in str(record.exc_info[1])


async def test_drain_lets_quick_tasks_finish_and_cancels_the_rest_with_a_log_line(
    caplog: pytest.LogCaptureFixture,
) -> None:
    scope = MetricsScope()
    tasks = BackgroundTasks(scope)
    finished: list[str] = []
    cleaned: list[str] = []

    async def quick() -> None:
        await asyncio.sleep(0.01)
        finished.append("quick")

    async def slow() -> None:
        try:
            await asyncio.sleep(60)
            finished.append("slow")
        finally:
            cleaned.append("slow")  # a cancelled task still unwinds within the drain

    tasks.spawn(quick(), "quick")
    tasks.spawn(slow(), "slow")
    with caplog.at_level(logging.INFO, logger="llm_sidecar.tasks"):
        await asyncio.wait_for(tasks.drain(0.2), 5)
    assert finished == ["quick"]
    assert cleaned == ["slow"]
    assert len(tasks) == 0
    assert counts(scope, "background_tasks_cancelled") == {("slow",): 1}
    assert "background_tasks_failed" not in scope.counters or not counts(scope, "background_tasks_failed")
    assert any(
        "cancelled 1 background task(s) still running after 0.2 s: slow × 1" in r.getMessage()
        for r in caplog.records
    )


async def test_drain_with_nothing_running_returns_at_once() -> None:
    tasks = BackgroundTasks(MetricsScope())
    await asyncio.wait_for(tasks.drain(30.0), 0.5)


def test_max_tasks_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_tasks ≥ 1"):
        BackgroundTasks(MetricsScope(), max_tasks=0)
