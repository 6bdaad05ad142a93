"""Logging off the event loop: the loop only puts records on a bounded queue; a thread writes them.

:func:`configure_logging` installs, on the root logger, the standard library's ``QueueHandler``
(its ``prepare`` overridden to pass the record as it is: no formatting on the loop) and starts a
``QueueListener`` thread that formats each record (text, or one JSON object a line with
``log.format: json``) and writes what it has to the stream in batches. Access lines
(:mod:`proxy.access_log`) go through the same queue as raw tuples, put there by
:meth:`LogHandle.access` without making a ``LogRecord`` at all, and are formatted by the listener
too.

Lines are written in batches, as nginx's ``access_log … flush=`` does: a put never wakes the
listener (a wake-up per line, a thread switch and a write per request, cost a mostly idle sidecar
more CPU than the request itself); the listener wakes every ``flush_s`` (0.1 s) and writes what
gathered in one write. Warnings and errors wake it at once, and so does a queue half full.

The queue is bounded. A full queue never blocks the loop: the line is dropped and counted, and
the listener says how many were dropped (a warning line at most every ``report_s``, and at
close). A record's arguments are formatted in the listener thread, a moment later: log values,
not objects that change right after the call.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import IO, Any, Final

import orjson

from proxy.access_format import ACCESS_LOGGER, AccessEntry, access_fields, access_text
from proxy.config import LogConfig

QUEUE_SIZE: Final = 10_000  # lines waiting for the listener; beyond it lines are dropped
FLUSH_S: Final = 0.1  # the listener writes what gathered this often (sooner: a warning, a half-full queue)
REPORT_S: Final = 10.0  # at most one "lines dropped" warning per this many seconds
FLUSH_LINES: Final = 512  # a batch is written once it has this many lines

TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LOGGER: Final = "llm_sidecar.log"
# What every LogRecord has; anything else on a record came from ``extra=`` and goes into its JSON.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_EMPTY: Final[Any] = object()


class LogQueue:
    """A bounded FIFO that the loop puts into without blocking, taking a lock or formatting.

    ``put_nowait`` appends to a deque (atomic under the GIL) unless ``maxsize`` items wait, in
    which case it counts a drop; it wakes a sleeping listener only once half of ``maxsize`` items
    wait (:meth:`put_urgent` wakes it at once). The count is approximate when several threads drop
    at once (it is a plain integer).
    """

    __slots__ = ("_items", "_sleeping", "_wake", "_wake_at", "dropped", "maxsize")

    def __init__(self, maxsize: int = QUEUE_SIZE) -> None:
        if maxsize < 1:
            raise ValueError(f"log queue size must be ≥ 1, got {maxsize}")
        self.maxsize = maxsize
        self._wake_at = max(1, maxsize // 2)
        self.dropped = 0
        self._items: deque[Any] = deque()
        self._sleeping = False
        self._wake = threading.Lock()
        self._wake.acquire()  # held while nothing is to do; released to wake the listener

    def put_nowait(self, item: Any) -> None:
        items = self._items
        if len(items) >= self.maxsize:
            self.dropped += 1
            return
        items.append(item)
        if self._sleeping and len(items) >= self._wake_at:
            self._notify()

    def put_urgent(self, item: Any) -> None:
        """Like :meth:`put_nowait`, and the listener writes it now (a warning, an error)."""
        self.put_nowait(item)
        if self._sleeping:
            self._notify()

    def put_sentinel(self, item: Any) -> None:
        """The listener's stop mark: queued even when the queue is full."""
        self._items.append(item)
        self._notify()

    def _notify(self) -> None:
        self._sleeping = False
        try:  # on the loop: a try costs less than contextlib.suppress
            self._wake.release()
        except RuntimeError:  # released by another producer: the listener is awake
            return

    def get(self, block: bool = True) -> Any:
        """The next item, or ``_EMPTY``; only the listener takes (``block`` is not used)."""
        try:
            return self._items.popleft()
        except IndexError:
            return _EMPTY

    def wait(self, timeout: float) -> None:
        """Sleep for ``timeout``, or until woken by an urgent line or a half-full queue (listener
        thread only)."""
        self._sleeping = True
        if len(self._items) < self._wake_at:
            self._wake.acquire(timeout=timeout)
        self._sleeping = False

    def __len__(self) -> int:
        return len(self._items)


class RawQueueHandler(logging.handlers.QueueHandler):
    """Puts the record on the queue as it is: message, arguments and exception are formatted by
    the listener (the stdlib's ``prepare`` formats here, on the caller's thread)."""

    queue: LogQueue

    def enqueue(self, record: Any) -> None:
        if type(record) is tuple or record.levelno < logging.WARNING:
            self.queue.put_nowait(record)
        else:
            self.queue.put_urgent(record)

    def prepare(self, record: logging.LogRecord) -> Any:
        # An access record (proxy.access_log.log_record_sink) travels as its raw entry.
        return getattr(record, "access", record)


class LineWriter(logging.Handler):
    """The listener thread's handler: formats records and access entries into lines (UTF-8),
    and writes what it has in one write (to the stream's binary buffer when it has one)."""

    def __init__(self, stream: IO[str], fmt: str = "text") -> None:
        super().__init__()
        self.stream = stream
        self.json = fmt == "json"
        self.text = logging.Formatter(TEXT_FORMAT)
        self._lines: list[bytes] = []
        self._times = TimeStamps()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (
                self.format_json(record) if self.json else self.text.format(record).encode(errors="replace")
            )
        except Exception:
            self.handleError(record)
            return
        self._add(line)

    def write_access(self, entry: AccessEntry) -> None:
        try:
            if self.json:
                line = orjson.dumps(access_fields(entry, self._times.iso(entry[0])), default=str)
            else:
                text = access_text(access_fields(entry))
                line = f"{self._times.local(entry[0])} INFO {ACCESS_LOGGER}: {text}".encode(errors="replace")
        except Exception as e:  # never lose the listener thread to one bad entry
            self.handle(_warning("an access line could not be formatted: %r", e))
            return
        self._add(line)

    def format_json(self, record: logging.LogRecord) -> bytes:
        out: dict[str, Any] = {
            "time": self._times.iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc_info"] = self.text.formatException(record.exc_info)
        elif record.exc_text:
            out["exc_info"] = record.exc_text
        if record.stack_info:
            out["stack_info"] = record.stack_info
        return orjson.dumps(out, default=str)

    def _add(self, line: bytes) -> None:
        lines = self._lines
        lines.append(line)
        if len(lines) >= FLUSH_LINES:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # the handler's own lock; logging.shutdown flushes too
            lines, self._lines = self._lines, []
            if not lines:
                return
            data = b"\n".join(lines) + b"\n"
            stream = self.stream
            try:
                buffer = getattr(stream, "buffer", None)
                if buffer is not None:  # stderr: bytes as they are, no decode and encode again
                    stream.flush()
                    buffer.write(data)
                    buffer.flush()
                else:
                    stream.write(data.decode(errors="replace"))
                    stream.flush()
            except (OSError, ValueError):  # stderr closed or gone: nothing better to do with them
                pass


class LogListener(logging.handlers.QueueListener):
    """The thread: takes what the queue has, formats it, writes it; reports dropped lines."""

    def __init__(
        self,
        queue: LogQueue,
        writer: LineWriter,
        *,
        flush_s: float = FLUSH_S,
        report_s: float = REPORT_S,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(queue, writer)
        self.log_queue = queue
        self.writer = writer
        self.flush_s = flush_s
        self.report_s = report_s
        self.now = now
        self.reported = 0  # drops already reported
        self._last_report = now()

    def dequeue(self, block: bool) -> Any:
        q = self.log_queue
        item = q.get()
        if item is not _EMPTY:
            return item
        self.writer.flush()  # the end of a batch: one write for all of it
        self.report_drops()
        while True:
            q.wait(self.flush_s)  # lines gather meanwhile (a put does not wake it)
            item = q.get()
            if item is not _EMPTY:
                return item
            self.report_drops()

    def handle(self, record: Any) -> None:
        if type(record) is tuple:
            self.writer.write_access(record)
        else:
            self.writer.handle(record)

    def enqueue_sentinel(self) -> None:
        self.log_queue.put_sentinel(None)  # QueueListener._sentinel: the thread ends on it

    def report_drops(self, force: bool = False) -> None:
        """A warning line saying how many lines were dropped since the last one (rate-limited)."""
        dropped = self.log_queue.dropped - self.reported
        if dropped <= 0:
            return
        now = self.now()
        if not force and now - self._last_report < self.report_s:
            return
        self.reported += dropped
        self._last_report = now
        self.writer.handle(
            _warning(
                "%d log lines dropped: the log queue (%d lines) was full; the output is slower than"
                " what is logged",
                dropped,
                self.log_queue.maxsize,
            )
        )
        self.writer.flush()

    def stop(self) -> None:
        if self._thread is not None:
            super().stop()
        self.writer.flush()
        self.report_drops(force=True)


class LogHandle:
    """What :func:`configure_logging` installed: the access sink, reconfiguration and close."""

    def __init__(self, queue: LogQueue, handler: RawQueueHandler, listener: LogListener) -> None:
        self.queue = queue
        self.handler = handler
        self.listener = listener
        # The access log's sink (proxy.access_log.AccessSink): the queue's put, nothing more.
        self.access: Callable[[AccessEntry], None] = queue.put_nowait
        self._saved: tuple[list[logging.Handler], int] | None = None
        self._closed = False

    @property
    def dropped(self) -> int:
        return self.queue.dropped

    def reconfigure(self, cfg: LogConfig) -> None:
        """Apply a reloaded ``log`` config: level and format (the thread and queue stay)."""
        logging.getLogger().setLevel(cfg.level.upper())
        self.listener.writer.json = cfg.format == "json"

    def close(self) -> None:
        """Stop the thread after it has written everything queued; put back the root logger's
        previous handlers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        root = logging.getLogger()
        root.removeHandler(self.handler)
        self.listener.stop()
        if self._saved is not None:
            handlers, level = self._saved
            for h in handlers:
                root.addHandler(h)
            root.setLevel(level)


def configure_logging(
    cfg: LogConfig,
    stream: IO[str] | None = None,
    *,
    queue_size: int = QUEUE_SIZE,
    flush_s: float = FLUSH_S,
    report_s: float = REPORT_S,
) -> LogHandle:
    """Route all logging through a bounded queue to a writer thread on ``stream`` (stderr).

    Replaces the root logger's handlers (they come back at ``close()``) and sets its level from
    ``cfg.level``. Call ``close()`` at exit so that what is queued is written.
    """
    queue = LogQueue(queue_size)
    writer = LineWriter(stream if stream is not None else sys.stderr, cfg.format)
    listener = LogListener(queue, writer, flush_s=flush_s, report_s=report_s)
    handler = RawQueueHandler(queue)
    root = logging.getLogger()
    handle = LogHandle(queue, handler, listener)
    handle._saved = (list(root.handlers), root.level)
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(cfg.level.upper())
    listener.start()
    return handle


class TimeStamps:
    """Time stamps for lines, the part down to the second made once per second."""

    __slots__ = ("_iso", "_iso_ms", "_iso_s", "_iso_stamp", "_local", "_local_s")

    def __init__(self) -> None:
        self._iso_s = self._local_s = self._iso_ms = -1
        self._iso = self._local = self._iso_stamp = ""

    def iso(self, t: float) -> str:
        """``2026-12-02T10:00:00.123Z`` (UTC); lines of one millisecond share one string."""
        ms = int(t * 1000)
        if ms == self._iso_ms:
            return self._iso_stamp
        s = ms // 1000
        if s != self._iso_s:
            self._iso_s, self._iso = s, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(s))
        self._iso_ms = ms
        self._iso_stamp = stamp = f"{self._iso}.{ms - s * 1000:03d}Z"
        return stamp

    def local(self, t: float) -> str:
        """The text format's time, as ``logging.Formatter`` writes ``asctime`` (local time)."""
        s = int(t)
        if s != self._local_s:
            self._local_s, self._local = s, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s))
        return f"{self._local},{int((t - s) * 1000):03d}"


def _warning(msg: str, *args: Any) -> logging.LogRecord:
    return logging.LogRecord(_LOGGER, logging.WARNING, __file__, 0, msg, args, None)
