"""systemd: the real sidecar against a fake NOTIFY_SOCKET, and the unit file checked by systemd-analyze.

systemd-analyze works offline: ``verify`` and ``security --offline=true`` read the unit file and need
no running systemd (PID 1 here is not systemd). ``verify`` insists that ExecStart=/ExecStartPre= name
executables that exist, so it runs on a copy pointing at this venv's ``llm-sidecar``.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from proxy.config import Config
from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import REPO_ROOT, SidecarProcess, minimal_config
from tests.notify_socket import FakeNotifySocket, Received

UNIT = REPO_ROOT / "systemd" / "llm-sidecar.service"
INSTALLED_BINARY = "/opt/llm-sidecar/bin/llm-sidecar"
CONSOLE_SCRIPT = Path(sys.executable).parent / "llm-sidecar"
MAX_EXPOSURE = 2.0
_EXPOSURE = re.compile(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)")


def systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("systemd-analyze")
    assert binary is not None, "systemd-analyze is needed (apt-get install systemd)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=30, check=False)


def service_section(unit_text: str) -> dict[str, list[str]]:
    """The [Service] assignments, each key's values in order (keys like ExecReload= repeat)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in unit_text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def runnable_copy(tmp_path: Path, unit_text: str | None = None) -> Path:
    """The unit, written to tmp_path with the installed binary's path replaced by this venv's."""
    text = (unit_text if unit_text is not None else UNIT.read_text()).replace(
        INSTALLED_BINARY, str(CONSOLE_SCRIPT)
    )
    copy = tmp_path / UNIT.name
    copy.write_text(text)
    return copy


def verify_problems(unit: Path) -> list[str]:
    """What ``systemd-analyze verify`` says about this unit (it may be silent on success)."""
    result = systemd_analyze("verify", "--man=no", "--generators=no", str(unit))
    lines = (result.stdout + result.stderr).splitlines()
    problems = [line for line in lines if unit.name in line or str(unit) in line]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {lines}")
    return problems


def exposure(unit: Path) -> float:
    result = systemd_analyze("security", "--offline=true", "--no-pager", str(unit))
    match = _EXPOSURE.search(result.stdout)
    assert match, f"no overall exposure level in:\n{result.stdout}\n{result.stderr}"
    return float(match.group(1))


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|ms)?", value)
    assert match, f"cannot read {value!r} as a time span"
    scale = {None: 1.0, "s": 1.0, "sec": 1.0, "min": 60.0, "ms": 0.001}[match.group(2)]
    return float(match.group(1)) * scale


def default_drain_timeout_s() -> float:
    """Config's drain_timeout_s default once it exists; the issue's 30 s until then."""
    fields = {f.name: f for f in dataclasses.fields(Config)}
    field = fields.get("drain_timeout_s")
    if field is not None and isinstance(field.default, int | float):
        return float(field.default)
    return 30.0


# --- the unit file -------------------------------------------------------------------------------


def test_the_unit_verifies(tmp_path: Path) -> None:
    assert verify_problems(runnable_copy(tmp_path)) == []


def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: a misspelt key and a missing binary are reported."""
    broken = UNIT.read_text().replace("TimeoutStopSec=", "TimeoutStopSc=")
    assert any("TimeoutStopSc" in p for p in verify_problems(runnable_copy(tmp_path, broken)))
    (tmp_path / "missing").mkdir()
    missing = tmp_path / "missing" / UNIT.name
    missing.write_text(UNIT.read_text())  # still pointing at /opt/llm-sidecar, absent here
    assert any("is not executable" in p for p in verify_problems(missing))


def test_every_command_of_the_unit_exists(tmp_path: Path) -> None:
    """verify checks ExecStart= and ExecStartPre=; ExecReload= is checked here."""
    service = service_section(runnable_copy(tmp_path).read_text())
    commands = [c for key, cs in service.items() if key.startswith("Exec") for c in cs]
    assert len(commands) >= 4
    for command in commands:
        executable = Path(command.lstrip("-@:+!").split()[0])
        assert executable.is_absolute() and shutil.which(str(executable)), command


def test_the_exposure_stays_at_most_2(tmp_path: Path) -> None:
    level = exposure(runnable_copy(tmp_path))
    assert level <= MAX_EXPOSURE, f"systemd-analyze security: exposure {level} > {MAX_EXPOSURE}"


def test_the_exposure_check_sees_the_hardening(tmp_path: Path) -> None:
    """Without its hardening block the same unit scores far worse: the figure above is measured."""
    text = UNIT.read_text()
    head, hardening = text.split("# Hardening", 1)
    bare = head + "[Install]" + hardening.split("[Install]", 1)[1]
    assert "ProtectSystem" not in bare
    assert exposure(runnable_copy(tmp_path, bare)) > 5.0


def test_the_unit_notifies_reloads_by_sighup_and_outlasts_the_drain() -> None:
    service = service_section(UNIT.read_text())
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert seconds(service["WatchdogSec"][-1]) > 0
    assert service["ExecReload"][-1] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == ["SIGTERM"]
    drain = default_drain_timeout_s()
    assert seconds(service["TimeoutStopSec"][-1]) >= drain + 5, "systemd would SIGKILL a drain"
    assert service["RestartPreventExitStatus"] == ["2"]


# --- the real sidecar ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def healthz_status(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n")
        return conn.recv(4096).split(b"\r\n", 1)[0]


def test_the_sidecar_tells_systemd_ready_watchdog_and_stopping(mock: MockProcess, tmp_path: Path) -> None:
    watchdog_usec = 500_000
    port = free_port()
    config = minimal_config(mock.url).replace('"127.0.0.1:0"', f'"127.0.0.1:{port}"')
    answered_at_ready: list[bytes] = []

    def on_message(message: Received) -> None:
        if message.first_line == b"READY=1" and not answered_at_ready:
            # Told READY=1, systemd lets clients in: the port must answer at that instant.
            try:
                answered_at_ready.append(healthz_status(port))
            except OSError as e:
                answered_at_ready.append(repr(e).encode())

    with FakeNotifySocket(tmp_path / "notify") as fake:
        fake.on_message(on_message)
        env = {"NOTIFY_SOCKET": fake.address, "WATCHDOG_USEC": str(watchdog_usec)}
        sidecar = SidecarProcess(config, tmp_path, env=env).start()
        try:
            assert sidecar.proc is not None
            pid = sidecar.proc.pid
            (ready,) = fake.wait_for(b"READY=1", timeout=10)
            assert answered_at_ready == [b"HTTP/1.1 200 OK"], sidecar.logs()
            pings = fake.wait_for(b"WATCHDOG=1", count=4, timeout=10)
            terminated_at = time.monotonic()
            assert sidecar.proc.poll() is None
            sidecar.proc.send_signal(signal.SIGTERM)
            (stopping,) = fake.wait_for(b"STOPPING=1", timeout=10)
            code = sidecar.proc.wait(20)
        finally:
            sidecar.stop()
        time.sleep(0.05)
        received = fake.received

    assert code == 0, sidecar.logs()
    assert received[0] == ready  # nothing before READY=1 ...
    assert {r.pid for r in received} == {pid}  # ... all from the main process (NotifyAccess=main)
    interval = watchdog_usec / 1e6 / 2
    gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
    assert all(interval * 0.7 < gap < watchdog_usec / 1e6 for gap in gaps), gaps
    assert stopping.at >= terminated_at
    assert [r.first_line for r in received].count(b"STOPPING=1") == 1
    assert all(r.first_line != b"READY=1" for r in received if r.at > stopping.at)


def test_a_watchdog_meant_for_another_process_is_not_pinged(mock: MockProcess, tmp_path: Path) -> None:
    """WATCHDOG_PID names the process systemd watches (here PID 1, not the sidecar): no pings."""
    with FakeNotifySocket(tmp_path / "notify") as fake:
        env = {"NOTIFY_SOCKET": fake.address, "WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}
        with SidecarProcess(minimal_config(mock.url), tmp_path, env=env):
            fake.wait_for(b"READY=1", timeout=10)
            time.sleep(0.5)  # five ping intervals
        assert b"WATCHDOG=1" not in fake.messages


def test_a_reload_is_reloading_then_ready_even_when_the_file_is_rejected(
    mock: MockProcess, tmp_path: Path
) -> None:
    with FakeNotifySocket(tmp_path / "notify") as fake:
        config = minimal_config(mock.url)
        with SidecarProcess(config, tmp_path, env={"NOTIFY_SOCKET": fake.address}) as sidecar:
            fake.wait_for(b"READY=1", timeout=10)
            before_us = time.monotonic_ns() // 1000
            assert sidecar.reload(config)
            (reloading,) = fake.wait_for(b"RELOADING=1", timeout=10)
            fake.wait_for(b"READY=1", count=2, timeout=10)
            assert not sidecar.reload("routes: [broken\n")
            fake.wait_for(b"RELOADING=1", count=2, timeout=10)
            fake.wait_for(b"READY=1", count=3, timeout=10)  # the old config serves on: ready again
        lines = reloading.data.split(b"\n")
        assert lines[1].startswith(b"MONOTONIC_USEC=")
        assert int(lines[1].split(b"=")[1]) >= before_us  # CLOCK_MONOTONIC, as systemd reads it
        order = [r.first_line for r in fake.received if r.first_line in (b"READY=1", b"RELOADING=1")]
        assert order == [b"READY=1", b"RELOADING=1", b"READY=1", b"RELOADING=1", b"READY=1"]
