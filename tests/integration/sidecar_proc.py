"""The sidecar as a real subprocess (``python -m proxy --config FILE``), for integration tests.

with SidecarProcess(config_text, tmp_path) as sidecar:   # listen.address may use port 0
    client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)

The config text is written to ``tmp_path/config.yaml``; the address is read from the start-up line
(``llm-sidecar listening on http://HOST:PORT | ...``), so port 0 works. stderr is kept in a file
so that a test can read the logs (``sidecar.logs()``) and a failing start shows them.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

REPO_ROOT = Path(__file__).resolve().parents[2]
_READY = re.compile(r"listening on https?://(\S+?):(\d+) ")
_RELOADED = re.compile(r"config (reloaded) from|reload of \S+ (rejected)")


def minimal_config(upstream_url: str, *, extra: str = "", upstream_extra: str = "") -> str:
    """The issue's minimal config on a free port, with an optional tail of YAML."""
    return (
        'listen: {address: "127.0.0.1:0"}\n'
        "upstreams:\n"
        f'  mock: {{url: "{upstream_url}"{upstream_extra}}}\n'
        "routes:\n"
        "  - model: demo-model\n"
        "    targets:\n"
        "      - {upstream: mock, model: mock-model-v1, weight: 100}\n"
        f"{extra}"
    )


class SidecarProcess:
    def __init__(
        self,
        config_text: str,
        workdir: Path,
        *,
        env: dict[str, str] | None = None,
        args: Sequence[str] = (),
        startup_timeout: float = 10.0,
    ) -> None:
        self.config_path = workdir / "config.yaml"
        self.config_path.write_text(config_text)
        self.log_path = workdir / "sidecar.log"
        self.env = env or {}
        self.args = tuple(args)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.host = ""
        self.port = 0

    def start(self) -> SidecarProcess:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1", **self.env)
        command = [sys.executable, "-m", "proxy", "--config", str(self.config_path), *self.args]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        deadline = time.monotonic() + self.startup_timeout
        while True:
            match = _READY.search(self.logs())
            if match:
                self.host, self.port = match.group(1), int(match.group(2))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited with {self.proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"sidecar not ready in {self.startup_timeout}s:\n{self.logs()}")
            time.sleep(0.01)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after ``timeout``; returns the exit code."""
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
        return proc.returncode

    def reload(self, config_text: str, timeout: float = 10.0) -> bool:
        """Write ``config_text`` over the config file, SIGHUP, wait for the sidecar to say how it
        went: True when it reloaded, False when it rejected the file."""
        assert self.proc is not None
        seen = self._reload_outcomes()
        self.config_path.write_text(config_text)
        self.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        while True:
            outcomes = self._reload_outcomes()
            if len(outcomes) > len(seen):
                return outcomes[len(seen)] == "reloaded"
            if time.monotonic() > deadline:
                raise TimeoutError(f"no reload outcome in {timeout}s:\n{self.logs()[-3000:]}")
            time.sleep(0.01)

    def _reload_outcomes(self) -> list[str]:
        return [a or b for a, b in _RELOADED.findall(self.logs())]

    def wait_log(self, text: str, timeout: float = 5.0) -> str:
        """The log once it holds ``text`` (a log thread writes lines a moment after they happen)."""
        deadline = time.monotonic() + timeout
        while text not in (logs := self.logs()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not in the log within {timeout}s:\n{logs[-3000:]}")
            time.sleep(0.01)
        return logs

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def __enter__(self) -> SidecarProcess:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
