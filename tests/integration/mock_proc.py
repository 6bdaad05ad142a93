"""The project's mock backend (``bench.mock_backend``) as a real subprocess, for integration tests.

with MockProcess() as mock:                   # or: mock = MockProcess().start(); ...; mock.stop()
    client = OpenAI(base_url=mock.base_url, api_key="x", max_retries=0)
    mock.set_faults(status_burst={"status": 503, "count": 2, "retry_after": 1})
    mock.wait_stats(lambda s: s["disconnects"] == 1)
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_PREFIX = "mock backend listening on "

Stats = dict[str, Any]


class MockProcess:
    """Starts ``python -m bench.mock_backend`` on a free port and talks to its control endpoints."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        args: Sequence[str] = (),
        startup_timeout: float = 10.0,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.args = tuple(args)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self._url: str | None = None
        self._client: httpx.Client | None = None

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> MockProcess:
        if self.proc is not None:
            raise RuntimeError("mock backend already started")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
        command = [sys.executable, "-m", "bench.mock_backend", "--host", self.host]
        command += ["--port", str(self.requested_port), *self.args]
        self.proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE
        )
        try:
            assert self.proc.stdout is not None
            line = _read_line(self.proc.stdout, self.startup_timeout, self.proc)
            if not line.startswith(READY_PREFIX):
                raise RuntimeError(f"mock backend printed {line!r}, expected {READY_PREFIX!r}...")
        except BaseException:
            self.stop()
            raise
        self._url = line.removeprefix(READY_PREFIX).strip()
        self._client = httpx.Client(base_url=self._url, timeout=5.0)
        return self

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code (0 on a clean exit)."""
        if self._client is not None:
            self._client.close()
            self._client = None
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        return proc.returncode

    def __enter__(self) -> MockProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- addresses ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash."""
        if self._url is None:
            raise RuntimeError("mock backend not started")
        return self._url

    @property
    def base_url(self) -> str:
        """The OpenAI ``base_url``: ``url + "/v1"``."""
        return self.url + "/v1"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    # ---- control endpoints --------------------------------------------------------------------

    def stats(self) -> Stats:
        stats: Stats = self._control("GET", "/_mock/stats").json()
        return stats

    def reset(self) -> None:
        """Zero the stats and clear the faults."""
        self._control("POST", "/_mock/reset")

    def set_faults(self, **faults: Any) -> None:
        """Replace the global faults (see ``bench.mock_backend.Faults``), e.g.
        ``status_burst={"status": 503, "count": 5, "retry_after": 1.5}``,
        ``status_ratio={"status": 503, "ratio": 0.05, "retry_after": None}``, ``reset_ratio=0.1``,
        ``first_byte_ms=200``, ``seed=1`` (drives every random fault)."""
        self._control("POST", "/_mock/faults", json=faults)

    def clear_faults(self) -> None:
        self._control("DELETE", "/_mock/faults")

    def set_health(self, status: int) -> None:
        """What ``GET /health`` answers from now on (200 at start and after ``reset``)."""
        self._control("POST", "/_mock/health", json={"status": status})

    def wait_stats(self, predicate: Callable[[Stats], bool], timeout: float = 2.0) -> Stats:
        """Poll the stats until ``predicate`` holds; raise ``TimeoutError`` with the last stats."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"mock stats did not reach the condition in {timeout}s: {stats}")
            time.sleep(0.005)

    def _control(self, method: str, path: str, json: Any = None) -> httpx.Response:
        if self._client is None:
            raise RuntimeError("mock backend not started")
        response = self._client.request(method, path, json=json)
        response.raise_for_status()
        return response


def _read_line(stream: IO[bytes], timeout: float, proc: subprocess.Popen[bytes]) -> str:
    """The first line of ``stream``, waiting at most ``timeout`` seconds."""
    fd, buffer = stream.fileno(), b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"mock backend printed no address within {timeout}s")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(f"mock backend exited with {proc.wait()} before printing its address")
        buffer += chunk
    return buffer.split(b"\n", 1)[0].decode()
