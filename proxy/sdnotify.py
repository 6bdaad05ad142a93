"""systemd's sd_notify protocol (Type=notify, WatchdogSec): datagrams to ``$NOTIFY_SOCKET``.

The serve loop tells systemd where it stands::

    notifier = Notifier()                 # reads NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID
    notifier.ready("serving 3 routes")    # once listening
    watchdog = loop.create_task(notifier.watchdog())
    notifier.reloading()                  # SIGHUP: before reading the new config
    notifier.ready()                      # after the swap, or after the new config was rejected
    notifier.stopping()                   # SIGTERM: before the drain

Without ``NOTIFY_SOCKET`` (not under systemd) every call does nothing. Sending is cheap: one
datagram socket per notifier, opened on the first message, non-blocking; a failed send is logged
once and otherwise ignored, since systemd's bookkeeping must never take the proxy down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

log = logging.getLogger("llm_sidecar.sdnotify")


class Notifier:
    """Messages to systemd, and the watchdog's pings from the event loop.

    ``env`` defaults to ``os.environ``; ``monotonic_ns`` is CLOCK_MONOTONIC in nanoseconds (the clock
    systemd compares ``MONOTONIC_USEC`` with); ``pid`` is this process's, compared with
    ``WATCHDOG_PID`` as ``sd_watchdog_enabled(3)`` does.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        pid: int | None = None,
    ) -> None:
        e = os.environ if env is None else env
        self._addr = _address(e.get("NOTIFY_SOCKET", ""))
        self._monotonic_ns = monotonic_ns
        self._sock: socket.socket | None = None
        self._send_failed = False
        self.watchdog_s = _watchdog_period(e, os.getpid() if pid is None else pid) if self._addr else 0.0

    @property
    def enabled(self) -> bool:
        """Whether there is a systemd to tell (``NOTIFY_SOCKET`` is set and usable)."""
        return bool(self._addr)

    @property
    def watchdog_interval_s(self) -> float:
        """How often ``watchdog()`` pings: half of ``WatchdogSec=`` (0 when there is no watchdog)."""
        return self.watchdog_s / 2

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: listening (at start) or serving again (after a reload, accepted or not)."""
        return self.notify(_with_status("READY=1", status))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC``, in one datagram, as ``Type=notify-reload`` requires."""
        usec = self._monotonic_ns() // 1000
        return self.notify(_with_status(f"RELOADING=1\nMONOTONIC_USEC={usec}", status))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the drain has begun."""
        return self.notify(_with_status("STOPPING=1", status))

    def status(self, text: str) -> bool:
        """``STATUS=…``: the line ``systemctl status`` shows."""
        return self.notify(_status_line(text))

    def notify(self, message: str) -> bool:
        """Send one datagram of newline-separated ``KEY=value`` lines; True when it went out."""
        if not self._addr:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self._addr)
        except OSError as e:
            if not self._send_failed:
                self._send_failed = True
                log.warning(
                    "cannot notify systemd at NOTIFY_SOCKET=%s: %s (further failures not logged)",
                    _shown(self._addr),
                    e.strerror or e,
                )
            return False
        return True

    async def watchdog(self) -> None:
        """Ping ``WATCHDOG=1`` at half the watchdog period, from the event loop itself.

        The pings are this coroutine's own wake-ups, so they are a proof of life of the loop: a loop
        blocked by a stuck callback stops pinging and systemd restarts the service after
        ``WatchdogSec=``. Returns at once when there is no watchdog; runs until cancelled otherwise.
        """
        interval = self.watchdog_interval_s
        if not interval:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> str:
    """The socket address for ``sendto``: a path, or ``@name`` as an abstract-namespace name."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    if value:
        log.warning("NOTIFY_SOCKET=%s is neither an absolute path nor @abstract: not notifying", value)
    return ""


def _watchdog_period(env: Mapping[str, str], pid: int) -> float:
    usec, watchdog_pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return 0.0
    if watchdog_pid and watchdog_pid != str(pid):
        return 0.0  # meant for another process (an ExecStartPre, a wrapper's parent)
    return int(usec) / 1e6


def _with_status(message: str, status: str | None) -> str:
    return message if status is None else f"{message}\n{_status_line(status)}"


def _status_line(text: str) -> str:
    # One message is newline-separated assignments: a newline in the text would start a new one.
    return "STATUS=" + " ".join(text.splitlines())


def _shown(addr: str) -> str:
    return "@" + addr[1:] if addr.startswith("\0") else addr
