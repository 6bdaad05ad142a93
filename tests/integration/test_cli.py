"""The real entry points: the ``llm-sidecar`` console script and ``python -m proxy``."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import REPO_ROOT, SidecarProcess, minimal_config

CONSOLE_SCRIPT = Path(sys.executable).parent / "llm-sidecar"

BAD_CONFIG = """\
listen: {address: "127.0.0.1:0"}
upstreams:
  mock: {url: "http://127.0.0.1:8001", max_connections: 0}
routes:
  - model: demo-model
    targets:
      - {upstream: mock, model: mock-model-v1, weight: 100}
      - {upstream: mock, model: mock-model-v2, weight: -1}
  - model: other
    targets: [{upstream: mock, model: x, wieght: 1}]
"""
EXPECTED_PROBLEMS = [
    "config.yaml:3: upstreams.mock.max_connections: must be an integer ≥ 1",
    "config.yaml:8: routes[0].targets[1].weight: must be a number ≥ 0",
    "config.yaml:10: routes[1].targets[0].wieght: unknown key",
]


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CONSOLE_SCRIPT), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout
    )


def test_the_console_script_is_installed() -> None:
    assert CONSOLE_SCRIPT.exists(), "pip install . must provide the llm-sidecar console script"
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("llm-sidecar ")


def test_check_config_accepts_the_shipped_config() -> None:
    result = run_cli("check-config", "config.yaml")
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


def test_check_config_reports_every_problem_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(BAD_CONFIG)
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    for problem in EXPECTED_PROBLEMS:
        assert problem in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("check-config", "{}"),
        ("check-config", "--config", "{}"),
        ("check-config", "-c", "{}"),
        ("--config", "{}", "check-config"),
    ],
)
def test_check_config_takes_the_file_as_an_argument_or_as_config(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text(BAD_CONFIG)
    result = run_cli(*(a.format(bad) for a in args))
    assert result.returncode == 2, result.stderr
    assert EXPECTED_PROBLEMS[0] in result.stderr
    good = run_cli(*(a.format("config.yaml") for a in args))
    assert good.returncode == 0 and good.stdout.startswith("config.yaml: OK"), good.stderr


def test_check_config_with_two_different_files_says_so(tmp_path: Path) -> None:
    result = run_cli("check-config", "config.yaml", "--config", str(tmp_path / "other.yaml"))
    assert result.returncode == 2
    assert "two config files" in result.stderr and "Traceback" not in result.stderr


def test_the_server_refuses_to_start_with_the_same_messages(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(BAD_CONFIG)
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    for problem in EXPECTED_PROBLEMS:
        assert problem in result.stderr, result.stderr


def test_a_route_to_an_unknown_upstream_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        minimal_config("http://127.0.0.1:8001").replace("{upstream: mock,", "{upstream: nowhere,")
    )
    result = run_cli("check-config", str(path))
    assert result.returncode == 2
    assert "config.yaml:7: routes[0].targets[0].upstream: unknown upstream 'nowhere'" in result.stderr


def test_yaml_syntax_errors_and_missing_files_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("listen: {address: [\n")
    result = run_cli("check-config", str(path))
    assert result.returncode == 2 and "broken.yaml:" in result.stderr and "Traceback" not in result.stderr
    missing = run_cli("check-config", str(tmp_path / "absent.yaml"))
    assert missing.returncode == 2 and "absent.yaml" in missing.stderr


def test_environment_variables_are_interpolated(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        minimal_config("${MOCK_URL:-http://127.0.0.1:8001}", upstream_extra=', api_key: "${KEY}"')
    )
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "check-config", str(path)], capture_output=True, text=True, timeout=20
    )
    assert result.returncode == 2 and "KEY" in result.stderr  # unset, without a default
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
        env={"KEY": "sk-1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr


def test_an_address_in_use_is_a_clear_start_up_error(mock: MockProcess, tmp_path: Path) -> None:
    config = minimal_config(mock.url).replace("127.0.0.1:0", f"127.0.0.1:{mock.port}")
    path = tmp_path / "config.yaml"
    path.write_text(config)
    result = run_cli("--config", str(path))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{mock.port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_start_up_line_names_address_routes_and_chain(mock: MockProcess, tmp_path: Path) -> None:
    with SidecarProcess(minimal_config(mock.url), tmp_path) as sidecar:
        line = next(x for x in sidecar.logs().splitlines() if "listening on" in x)
    assert f"http://127.0.0.1:{sidecar.port}" in line
    assert "demo-model → mock/mock-model-v1 (100)" in line
    assert "chain: forward" in line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_lets_in_flight_streams_finish_then_exits_0(
    mock: MockProcess, tmp_path: Path, sig: signal.Signals
) -> None:
    sidecar = SidecarProcess(minimal_config(mock.url), tmp_path).start()
    proc = sidecar.proc
    assert proc is not None
    body = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    knobs = {"x-mock-chunks": "20", "x-mock-delay-ms": "15"}
    received: list[bytes] = []
    try:
        with (
            httpx.Client(timeout=10) as http,
            http.stream("POST", sidecar.base_url + "/chat/completions", json=body, headers=knobs) as resp,
        ):
            chunks = resp.iter_raw()
            received.append(next(chunks))
            threading.Timer(0.0, proc.send_signal, (sig,)).start()
            received.extend(chunks)
        assert proc.wait(10) == 0
    finally:
        sidecar.stop()
    stream = b"".join(received)
    assert stream.count(b"data: ") == 22  # role + 20 content + finish ... then [DONE]
    assert stream.rstrip().endswith(b"data: [DONE]")
    # Once stopping, it no longer accepts connections.
    with pytest.raises(httpx.ConnectError):
        httpx.get(sidecar.url + "/healthz", timeout=2)


def test_python_dash_m_proxy_serves(mock: MockProcess, tmp_path: Path) -> None:
    started = time.monotonic()
    with SidecarProcess(minimal_config(mock.url), tmp_path) as sidecar:
        response = httpx.get(sidecar.base_url + "/models")
        assert response.json()["data"][0]["id"] == "demo-model"
        assert time.monotonic() - started < 10


def test_systemd_notify_ready_watchdog_and_stopping(mock: MockProcess, tmp_path: Path) -> None:
    """Type=notify: READY=1 once listening, WATCHDOG=1 pings, STOPPING=1 on SIGTERM."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))
        notify.settimeout(5)
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "200000"}
        sidecar = SidecarProcess(minimal_config(mock.url), tmp_path, env=env).start()
        try:
            messages = [notify.recv(4096).decode() for _ in range(3)]
            assert messages[0] == "READY=1"
            assert messages[1:] == ["WATCHDOG=1", "WATCHDOG=1"]
        finally:
            assert sidecar.stop() == 0
        rest = []
        with contextlib.suppress(TimeoutError):
            notify.settimeout(1)
            while True:
                rest.append(notify.recv(4096).decode())
        assert "STOPPING=1" in rest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_demo(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bench.demo", *args]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)


def test_make_run_with_the_mock_port_taken_says_why_the_mock_could_not_start() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_demo("--mock-port", str(taken.getsockname()[1]))
    assert result.returncode != 0
    assert "mock backend exited with 1 before it was ready" in result.stderr
    assert "address already in use" in result.stderr, result.stderr


def test_make_run_with_the_sidecar_port_taken_says_why_the_sidecar_could_not_start(tmp_path: Path) -> None:
    mock_port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = minimal_config(f"http://127.0.0.1:{mock_port}").replace("127.0.0.1:0", f"127.0.0.1:{port}")
        path = tmp_path / "config.yaml"
        path.write_text(config)
        result = run_demo("--config", str(path), "--mock-port", str(mock_port))
    assert result.returncode != 0
    assert "llm-sidecar exited with 1 before it was ready (its output is above)" in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stdout, result.stdout
