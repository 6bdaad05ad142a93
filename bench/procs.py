"""The load runner's processes: tools installed with apt-get, children started pinned and stopped, /proc.

``ensure_tools`` finds nginx and wrk (installing them when missing), ``Children`` starts the servers,
each pinned to a CPU and logging to a file, and stops them all on the way out; ``cpu_seconds`` and
``peak_rss_mib`` read a process's CPU time and peak memory, ``CpuSnapshot`` the machine's idle time.
"""

from __future__ import annotations

import ctypes
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from bench.common import HOST, REPO_ROOT, BenchError, say

T = TypeVar("T")

# ---- tools ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tools:
    nginx: str
    wrk: str


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    return next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None)


def ensure_tools() -> Tools:
    """nginx and wrk, installed with apt-get when missing (``apt-get update`` only if that fails)."""
    missing = [name for name in ("nginx", "wrk") if find_tool(name) is None]
    if missing:
        apt_install(missing)
    nginx_bin, wrk_bin = find_tool("nginx"), find_tool("wrk")
    if nginx_bin is None or wrk_bin is None:
        raise BenchError("nginx and wrk are needed: apt-get install -y nginx wrk")
    return Tools(nginx=nginx_bin, wrk=wrk_bin)


def apt_install(packages: list[str]) -> None:
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = [*sudo, "apt-get", "install", "-y", *packages]
    say(f"installing {' '.join(packages)}: {shlex.join(install)}")
    done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        say("apt-get install failed; running apt-get update and trying again")
        subprocess.run([*sudo, "apt-get", "update"], env=env, capture_output=True, check=False)
        done = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BenchError(f"{shlex.join(install)} failed ({done.returncode}):\n{done.stderr[-2000:]}")


# ---- processes and /proc -------------------------------------------------------------------------


def child_setup(cpu: int) -> Callable[[], None]:
    """What a child runs before exec: pin it to ``cpu``, and have it get SIGTERM if the runner dies."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    pr_set_pdeathsig = 1

    def setup() -> None:
        os.sched_setaffinity(0, {cpu})
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return setup


class Children:
    """The servers this runner starts, each logging to ``workdir/NAME.log``; leaving ``with`` stops all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        self.env = dict(os.environ, PYTHONPATH=pythonpath, PYTHONUNBUFFERED="1")

    def start(self, name: str, argv: Sequence[str], cpu: int) -> subprocess.Popen[bytes]:
        with self.log_path(name).open("wb") as log:
            proc = subprocess.Popen(
                argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=child_setup(cpu),
                start_new_session=True,  # Ctrl-C reaches the runner only, which stops them in order
            )
        self.procs.append(proc)
        return proc

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def log(self, name: str) -> str:
        path = self.log_path(name)
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def wait_ready(
    check: Callable[[], T | None], proc: subprocess.Popen[bytes], what: str, log: Callable[[], str]
) -> T:
    """Poll ``check`` until it returns a value; fail when ``proc`` exits or 15 s pass."""
    deadline = time.monotonic() + 15.0
    while True:
        value = check()
        if value is not None:
            return value
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before it was ready:\n{log()}")
        if time.monotonic() > deadline:
            raise BenchError(f"{what} was not ready within 15 s:\n{log()}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def accepts(port: int) -> bool | None:
    try:
        socket.create_connection((HOST, port), timeout=0.5).close()
    except OSError:
        return None
    return True


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return ticks / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pids: Sequence[int]) -> float:
    """The sum of the processes' VmHWM (peak resident set), in MiB."""
    kib = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                kib += int(line.split()[1])
    return kib / 1024


def child_pids(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in children.read_text().split()] if children.exists() else []


@dataclass(frozen=True)
class CpuSnapshot:
    """Idle time of all CPUs and the CPU time of this runner and its reaped children, in seconds."""

    at: float
    idle_s: float  # idle + iowait from /proc/stat: measured, where user/system ticks get lost here
    ours_s: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        idle, iowait = (int(x) for x in Path("/proc/stat").read_text().split()[4:6])
        ours = 0.0
        for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
            usage = resource.getrusage(who)
            ours += usage.ru_utime + usage.ru_stime
        return cls(time.monotonic(), (idle + iowait) / os.sysconf("SC_CLK_TCK"), ours)


def cpu_not_ours(before: CpuSnapshot, after: CpuSnapshot) -> tuple[float, float]:
    """CPU seconds spent outside this runner and its children between the snapshots, and their share.

    That is other processes and kernel threads; ksoftirqd serving the run's own loopback traffic
    alone comes to some 4 % here. ``after`` must follow the wait for every child.
    """
    wall = after.at - before.at
    busy = wall * (os.cpu_count() or 1) - (after.idle_s - before.idle_s)
    other = max(0.0, busy - (after.ours_s - before.ours_s))
    return other, other / (wall * (os.cpu_count() or 1))


def raise_fd_limit() -> None:
    """Allow 1000+ connections in wrk, the mock and the proxies (children inherit the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
