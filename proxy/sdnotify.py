"""systemd's sd_notify protocol (Type=notify, WatchdogSec): a datagram to $NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        e = env if env is not None else dict(os.environ)
        addr = e.get("NOTIFY_SOCKET", "")
        if addr.startswith("@"):
            addr = "\0" + addr[1:]  # abstract namespace
        self._addr = addr
        usec = e.get("WATCHDOG_USEC", "")
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() else 0.0

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def notify(self, message: str) -> None:
        if not self._addr:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s, contextlib.suppress(OSError):
            s.sendto(message.encode(), self._addr)

    async def watchdog(self) -> None:
        """Ping the watchdog at half its period while the event loop is alive."""
        if not self.watchdog_s:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_s / 2)
