"""h2load, the HTTP/2 load generator of bench/h2.py: installing it, running it pinned, its result.

h2load (apt package ``nghttp2-client``) is installed with apt-get when missing. ``run_h2load`` runs it
with one thread on a CPU, POSTing a body file (``-d``) for a duration or a number of requests, and
parses what it prints into an ``H2loadResult``.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.common import CHAT_PATH, BenchError
from bench.procs import apt_install, child_setup, find_tool
from bench.servers import Target

_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored"
    r"(?:, (\d+) timeout)?"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


@dataclass(frozen=True)
class H2loadResult:
    """What one h2load run printed."""

    seconds: float
    rps: float
    done: int
    succeeded: int
    errors: int  # requests done without a 2xx answer (h2load's failed, errored, timed out, or 3xx)

    @classmethod
    def parse(cls, out: str) -> H2loadResult:
        finished, requests, status = _FINISHED.search(out), _REQUESTS.search(out), _STATUS.search(out)
        if finished is None or requests is None or status is None:
            raise BenchError(f"h2load printed no result:\n{out[-2000:]}")
        seconds = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
        done, succeeded = int(requests.group(3)), int(requests.group(4))
        # Done = succeeded + failed (failed: errored, timed out, or not 2xx/3xx); 3xx counts as an error here.
        # A timed run's last answers can reach the status count and not "done" (seen: 2xx = done + 1):
        # that is not a negative number of errors.
        errors = max(0, done - int(status.group(1)))
        return cls(seconds, float(finished.group(3)), done, succeeded, errors)


def ensure_h2load() -> str:
    if find_tool("h2load") is None:
        apt_install(["nghttp2-client"])
    found = find_tool("h2load")
    if found is None:
        raise BenchError("h2load is needed: apt-get install -y nghttp2-client")
    return found


def h2load_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout.strip().splitlines() or ["unknown"])[0]


def run_h2load(
    binary: str,
    target: Target,
    clients: int,
    streams: int,
    body: Path,
    cpu: int,
    *,
    seconds: int | None = None,
    requests: int | None = None,
    headers: Sequence[tuple[str, str]] = (),
) -> H2loadResult:
    argv = [binary, "-t1", f"-c{clients}", f"-m{streams}", "-d", str(body)]
    argv += ["-H", "content-type: application/json"]
    for name, value in headers:
        argv += ["-H", f"{name}: {value}"]
    argv += [f"-D{seconds}"] if seconds is not None else [f"-n{requests}"]
    done = subprocess.run(
        [*argv, target.url + CHAT_PATH],
        capture_output=True,
        text=True,
        timeout=(seconds or 0) + 120,
        check=False,
        preexec_fn=child_setup(cpu),
        start_new_session=True,
    )
    return H2loadResult.parse(done.stdout + done.stderr)
