"""proxy.sdnotify against a fake NOTIFY_SOCKET: what systemd is told, and when the watchdog pings."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import uvloop

from proxy.sdnotify import Notifier
from tests.notify_socket import FakeNotifySocket, Received

WATCHDOG_USEC = 200_000  # WatchdogSec=0.2s: pings every 0.1 s


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeNotifySocket]:
    with FakeNotifySocket(tmp_path / "notify") as sock:
        yield sock


def settle(fake: FakeNotifySocket, expected: int, timeout: float = 2.0) -> list[bytes]:
    """What arrived, once ``expected`` datagrams did (and a little longer, to catch extra ones)."""
    deadline = time.monotonic() + timeout
    while len(fake.received) < expected and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    return fake.messages


def run_in_uvloop(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` in a fresh uvloop, the loop the sidecar serves on."""

    async def wrapper() -> None:
        await main()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(wrapper())


def test_ready_is_one_datagram(fake: FakeNotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": fake.address})
    assert notifier.ready()
    assert settle(fake, 1) == [b"READY=1"]


def test_ready_with_a_status(fake: FakeNotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": fake.address})
    notifier.ready("serving 2 routes")
    assert settle(fake, 1) == [b"READY=1\nSTATUS=serving 2 routes"]


def test_reloading_carries_monotonic_usec_in_the_same_datagram(fake: FakeNotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": fake.address})
    before = time.monotonic_ns() // 1000
    notifier.reloading()
    after = time.monotonic_ns() // 1000
    (message,) = settle(fake, 1)
    lines = message.split(b"\n")
    assert lines[0] == b"RELOADING=1"
    assert len(lines) == 2 and lines[1].startswith(b"MONOTONIC_USEC=")
    usec = int(lines[1].removeprefix(b"MONOTONIC_USEC="))
    assert before <= usec <= after  # CLOCK_MONOTONIC in µs, as systemd reads it


def test_reloading_reads_the_injected_clock(fake: FakeNotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": fake.address}, monotonic_ns=lambda: 1_234_567_891)
    notifier.reloading("reloading config.yaml")
    assert settle(fake, 1) == [b"RELOADING=1\nMONOTONIC_USEC=1234567\nSTATUS=reloading config.yaml"]


def test_a_reload_is_reloading_then_ready(fake: FakeNotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": fake.address}, monotonic_ns=lambda: 5_000_000)
    notifier.ready()
    notifier.reloading()
    notifier.ready()
    notifier.stopping()
    assert settle(fake, 4) == [b"READY=1", b"RELOADING=1\nMONOTONIC_USEC=5000", b"READY=1", b"STOPPING=1"]


def test_stopping_and_status(fake: FakeNotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": fake.address})
    notifier.stopping()
    notifier.status("draining 3 requests\nlast line")  # a newline would start another assignment
    assert settle(fake, 2) == [b"STOPPING=1", b"STATUS=draining 3 requests last line"]


def test_an_abstract_namespace_address() -> None:
    with FakeNotifySocket.abstract() as fake:
        assert fake.address.startswith("@")
        notifier = Notifier({"NOTIFY_SOCKET": fake.address})
        notifier.ready()
        notifier.stopping()
        assert settle(fake, 2) == [b"READY=1", b"STOPPING=1"]


def test_the_environment_is_read_by_default(fake: FakeNotifySocket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
    Notifier().ready()
    assert settle(fake, 1) == [b"READY=1"]


def test_the_sender_is_this_process(fake: FakeNotifySocket) -> None:
    """NotifyAccess=main: systemd takes only the main process's messages."""
    Notifier({"NOTIFY_SOCKET": fake.address}).ready()
    settle(fake, 1)
    assert [r.pid for r in fake.received] == [os.getpid()]


@pytest.mark.parametrize("value", [None, "", "relative/path"])
def test_nothing_is_sent_without_a_notify_socket(
    value: str | None, fake: FakeNotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    notifier = Notifier()
    assert not notifier.enabled
    assert notifier.watchdog_interval_s == 0
    sent = [notifier.ready(), notifier.reloading(), notifier.stopping(), notifier.status("x")]
    sent.append(notifier.notify("WATCHDOG=1"))
    assert sent == [False] * 5
    # With nothing to tell, the watchdog is not a task that lingers: it returns at once.
    run_in_uvloop(lambda: asyncio.wait_for(notifier.watchdog(), 0.5))
    assert settle(fake, 0) == []


def test_one_socket_per_notifier(fake: FakeNotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": fake.address})
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        notifier.status("x")
    assert len(os.listdir("/proc/self/fd")) == fds_before + 1
    settle(fake, 50)
    notifier.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before


@pytest.mark.timeout(10)
def test_a_full_socket_neither_blocks_nor_raises_and_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unread:  # nobody reads it: it fills up
        unread.bind(str(tmp_path / "full"))
        notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "full")})
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, "llm_sidecar.sdnotify"):
            sent = [notifier.notify("WATCHDOG=1") for _ in range(2000)]
        assert time.monotonic() - started < 1.0
    assert sent[0] and not sent[-1]
    warnings = [r.getMessage() for r in caplog.records if r.name == "llm_sidecar.sdnotify"]
    assert len(warnings) == 1 and "cannot notify systemd" in warnings[0]


def test_a_missing_socket_is_logged_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    with caplog.at_level(logging.WARNING, "llm_sidecar.sdnotify"):
        assert not notifier.ready()
        assert not notifier.stopping()
    warnings = [r.getMessage() for r in caplog.records if r.name == "llm_sidecar.sdnotify"]
    assert len(warnings) == 1 and str(tmp_path / "gone") in warnings[0]


def test_the_watchdog_period_is_half_of_watchdog_usec() -> None:
    env = {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "10000000"}
    assert Notifier(env).watchdog_interval_s == 5.0
    assert Notifier({**env, "WATCHDOG_PID": "4242"}, pid=4242).watchdog_interval_s == 5.0
    # WATCHDOG_PID names another process (sd_watchdog_enabled(3)): not ours to ping.
    assert Notifier({**env, "WATCHDOG_PID": "4243"}, pid=4242).watchdog_interval_s == 0
    assert Notifier({**env, "WATCHDOG_USEC": "0"}).watchdog_interval_s == 0
    assert Notifier({**env, "WATCHDOG_USEC": "soon"}).watchdog_interval_s == 0
    assert Notifier({"WATCHDOG_USEC": "10000000"}).watchdog_interval_s == 0


def pings(fake: FakeNotifySocket) -> list[Received]:
    return [r for r in fake.received if r.data == b"WATCHDOG=1"]


def test_the_watchdog_pings_at_half_its_period(fake: FakeNotifySocket) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": fake.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    interval = WATCHDOG_USEC / 1e6 / 2
    times: dict[str, float] = {}

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(notifier.watchdog())
        times["start"] = time.monotonic()
        await asyncio.sleep(1.0)
        task.cancel()
        times["end"] = time.monotonic()

    run_in_uvloop(main)
    settle(fake, 0)
    at = [r.at for r in pings(fake)]
    assert fake.messages == [b"WATCHDOG=1"] * len(at)
    assert at[0] - times["start"] < interval  # the first ping at once
    assert 8 <= len(at) <= 12, f"{len(at)} pings in 1 s at one per {interval} s"
    gaps = [b - a for a, b in itertools.pairwise(at)]
    assert min(gaps) > interval * 0.7, gaps  # not a busy loop
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps  # never a whole period without one
    assert all(a <= times["end"] + 0.02 for a in at)  # cancelled: no more pings


def test_a_blocked_loop_stops_the_pings(fake: FakeNotifySocket) -> None:
    """The pings are the loop's proof of life: a stuck callback stops them, so systemd restarts it."""
    notifier = Notifier({"NOTIFY_SOCKET": fake.address, "WATCHDOG_USEC": str(WATCHDOG_USEC)})
    period = WATCHDOG_USEC / 1e6
    times: dict[str, float] = {}

    def stuck_callback() -> None:  # blocks the loop for three watchdog periods
        times["blocked"] = time.monotonic()
        time.sleep(3 * period)
        times["unblocked"] = time.monotonic()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = loop.create_task(notifier.watchdog())
        loop.call_later(0.35, stuck_callback)
        await asyncio.sleep(0.35 + 3 * period + 0.35)
        task.cancel()

    run_in_uvloop(main)
    settle(fake, 0)
    at = [r.at for r in pings(fake)]
    before = [a for a in at if a < times["blocked"]]
    during = [a for a in at if times["blocked"] + 0.02 < a < times["unblocked"]]
    after = [a for a in at if a >= times["unblocked"]]
    assert len(before) >= 3, at
    assert during == [], f"pings while the loop was blocked: {during}"
    assert len(after) >= 2, at  # and they come back with the loop
    silence = after[0] - before[-1]
    assert silence > period, f"systemd would not have noticed a {silence:.3f} s silence"
