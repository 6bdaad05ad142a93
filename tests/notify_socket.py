"""A fake systemd NOTIFY_SOCKET: an AF_UNIX datagram socket that records what it is told.

with FakeNotifySocket(tmp_path / "notify") as fake:     # or FakeNotifySocket.abstract()
    env = {"NOTIFY_SOCKET": fake.address}
    ...
    fake.wait_for(b"READY=1")

A thread receives each datagram as it arrives and stamps it with ``time.monotonic()`` and the
sender's pid (SO_PASSCRED, as systemd checks ``NotifyAccess=main``), so a test can tell when a
message came and from whom, while the event loop under test runs (or is blocked) in its own thread.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclasses.dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() on arrival
    data: bytes
    pid: int  # the sender's

    @property
    def first_line(self) -> bytes:
        return self.data.split(b"\n", 1)[0]


class FakeNotifySocket:
    def __init__(self, path: Path | None = None, *, abstract_name: str | None = None) -> None:
        if (path is None) == (abstract_name is None):
            raise ValueError("give a path or an abstract name")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if path is not None:
            self.address = str(path)
            self._sock.bind(self.address)
        else:
            self.address = "@" + str(abstract_name)
            self._sock.bind("\0" + str(abstract_name))
        self._sock.settimeout(0.05)
        self._received: list[Received] = []
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._on_message: Callable[[Received], None] | None = None
        self._thread = threading.Thread(target=self._run, name="fake-notify-socket", daemon=True)

    @classmethod
    def abstract(cls) -> FakeNotifySocket:
        return cls(abstract_name=f"llm-sidecar-test-{os.getpid()}-{time.monotonic_ns()}")

    def on_message(self, callback: Callable[[Received], None]) -> None:
        """Call ``callback`` in the receiving thread as each datagram arrives (before recording it)."""
        self._on_message = callback

    def _run(self) -> None:
        while not self._closing.is_set():
            try:
                data, ancillary, _flags, _addr = self._sock.recvmsg(4096, socket.CMSG_SPACE(_CREDS.size))
            except TimeoutError:
                continue
            except OSError:
                return
            at = time.monotonic()
            pid = 0
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _CREDS.unpack(payload[: _CREDS.size])[0]
            message = Received(at, data, pid)
            if self._on_message is not None:
                self._on_message(message)
            with self._cond:
                self._received.append(message)
                self._cond.notify_all()

    @property
    def received(self) -> list[Received]:
        with self._cond:
            return list(self._received)

    @property
    def messages(self) -> list[bytes]:
        return [r.data for r in self.received]

    def wait_for(self, first_line: bytes, timeout: float = 5.0, *, count: int = 1) -> list[Received]:
        """Wait until ``count`` datagrams whose first line is ``first_line`` arrived; return them.

        (``READY=1`` and ``READY=1\nSTATUS=...`` both count as ``READY=1``.)"""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [r for r in self._received if r.first_line == first_line]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [r.data for r in self._received]
                    raise AssertionError(f"{count} x {first_line!r} not received in {timeout}s; got {got}")
                self._cond.wait(left)

    def __enter__(self) -> FakeNotifySocket:
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing.set()
        self._thread.join(2)
        self._sock.close()
