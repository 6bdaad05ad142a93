"""proxy/logs.py: logging through a bounded queue to a writer thread (text or JSON lines)."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from proxy.access_format import AccessEntry, log_record_sink
from proxy.config import LogConfig
from proxy.http import RequestContext
from proxy.logs import LogHandle, LogQueue, configure_logging
from proxy.routing import Target

MAIN = threading.current_thread()


@pytest.fixture
def handles() -> Iterator[list[LogHandle]]:
    """Handles a test made; closed at its end whatever happened (the root logger is restored)."""
    made: list[LogHandle] = []
    yield made
    for handle in made:
        handle.close()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def entry(**fields: object) -> AccessEntry:
    """An access entry as proxy.access_log.AccessLog makes it; ``fields`` override the defaults."""
    ctx = RequestContext(b"rid-1", "127.0.0.1:5000", 100.0)
    ctx.target = Target("mock", "mock-model-v1", 1.0)
    values: dict[str, object] = {
        "wall": 1_800_000_000.25,
        "ctx": ctx,
        "method": "POST",
        "path": "/v1/chat/completions",
        "route": "demo-model",
        "status": 200,
        "error_type": None,
        "outcome": None,
        "bytes_in": 40,
        "bytes_out": 100,
        "usage_source": None,
        "first_chunk": -1.0,
        "end": 100.0125,
        "body_in": None,
        "body_out": None,
    }
    assert set(fields) <= set(values)
    values.update(fields)
    return tuple(values.values())


def test_json_format_writes_one_parseable_object_a_line(handles: list[LogHandle]) -> None:
    out = io.StringIO()
    handles.append(handle := configure_logging(LogConfig(format="json"), out))
    log = logging.getLogger("llm_sidecar.test")
    log.info("hello %s", "world", extra={"upstream": "mock", "n": 3})
    try:
        raise ZeroDivisionError("boom")
    except ZeroDivisionError:
        log.exception("it failed")
    handle.access(entry(usage_source=b'{"usage":{"prompt_tokens":5,"completion_tokens":2}}'))
    handle.close()
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 3
    first, failed, access = lines
    assert first["level"] == "info" and first["logger"] == "llm_sidecar.test"
    assert first["message"] == "hello world"
    assert (first["upstream"], first["n"]) == ("mock", 3)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert failed["level"] == "error" and "ZeroDivisionError: boom" in failed["exc_info"]
    assert access["logger"] == "llm_sidecar.access"
    assert access["time"] == "2027-01-15T08:00:00.250Z"
    assert (access["request_id"], access["status"], access["route"]) == ("rid-1", 200, "demo-model")
    assert (access["tokens_in"], access["tokens_out"], access["duration_ms"]) == (5, 2, 12.5)


def test_text_format_is_time_level_logger_message(handles: list[LogHandle]) -> None:
    out = io.StringIO()
    handles.append(handle := configure_logging(LogConfig(), out))
    logging.getLogger("llm_sidecar.test").warning("careful: %d", 7)
    handle.access(entry())
    handle.close()
    event, access = out.getvalue().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING llm_sidecar.test: careful: 7", event)
    assert access.endswith(
        ' INFO llm_sidecar.access: rid-1 127.0.0.1:5000 "POST /v1/chat/completions" 200'
        " mock/mock-model-v1 12.5ms route=demo-model bytes_in=40 bytes_out=100 attempts=1"
    )


def test_the_level_comes_from_the_config(handles: list[LogHandle]) -> None:
    out = io.StringIO()
    handles.append(handle := configure_logging(LogConfig(level="warning"), out))
    logging.getLogger("llm_sidecar.test").info("not shown")
    logging.getLogger("llm_sidecar.test").warning("shown")
    handle.reconfigure(LogConfig(level="debug", format="json"))
    logging.getLogger("llm_sidecar.test").debug("now shown, as JSON")
    handle.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and "shown" in lines[0] and "not shown" not in out.getvalue()
    assert json.loads(lines[1])["message"] == "now shown, as JSON"


class ThreadRecorder:
    """An argument whose formatting records the thread that formatted it."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def __str__(self) -> str:
        self.threads.append(threading.current_thread())
        return "recorded"


class RecordingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writers: list[threading.Thread] = []

    def write(self, s: str) -> int:
        self.writers.append(threading.current_thread())
        return super().write(s)


def test_formatting_and_writing_happen_in_the_listener_thread(handles: list[LogHandle]) -> None:
    out = RecordingStream()
    handles.append(handle := configure_logging(LogConfig(format="json"), out))
    arg = ThreadRecorder()
    logging.getLogger("llm_sidecar.test").info("value: %s", arg)
    wait_for(lambda: "recorded" in out.getvalue())
    assert arg.threads and all(t is not MAIN for t in arg.threads)
    assert out.writers and all(t is not MAIN for t in out.writers)
    handle.close()


class BlockingStream(io.StringIO):
    """A stream whose writes wait for ``release`` (an output that has fallen behind)."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.writing.set()
        assert self.release.wait(10)
        return super().write(s)


def test_a_full_queue_drops_and_counts_lines_instead_of_blocking(handles: list[LogHandle]) -> None:
    out = BlockingStream()
    handles.append(handle := configure_logging(LogConfig(), out, queue_size=5))
    log = logging.getLogger("llm_sidecar.test")
    log.info("line 0")
    assert out.writing.wait(5)  # the listener is stuck in its write: nothing more leaves the queue
    started = time.monotonic()
    for i in range(1, 101):
        log.info("line %d", i)
    handle.access(entry())  # an access line is dropped like any other
    assert time.monotonic() - started < 1.0  # never waited for room
    assert handle.dropped == 96  # 5 waited in the queue
    out.release.set()
    handle.close()
    lines = out.getvalue().splitlines()
    assert [line.rsplit(": ", 1)[1] for line in lines[:6]] == [f"line {i}" for i in range(6)]
    assert "96 log lines dropped: the log queue (5 lines) was full" in lines[6]
    assert len(lines) == 7


def test_drops_are_reported_while_running_not_only_at_close(handles: list[LogHandle]) -> None:
    out = BlockingStream()
    handles.append(handle := configure_logging(LogConfig(), out, queue_size=2, report_s=0.05))
    log = logging.getLogger("llm_sidecar.test")
    log.info("first")
    assert out.writing.wait(5)
    for i in range(10):
        log.info("more %d", i)
    out.release.set()
    wait_for(lambda: "8 log lines dropped" in out.getvalue())
    log.info("after")
    wait_for(lambda: "after" in out.getvalue())
    handle.close()
    assert out.getvalue().count("dropped") == 1  # reported once


def test_an_access_record_made_without_the_handle_travels_as_its_entry(handles: list[LogHandle]) -> None:
    out = io.StringIO()
    handles.append(handle := configure_logging(LogConfig(format="json"), out))
    log_record_sink(entry(status=404))
    handle.close()
    [line] = out.getvalue().splitlines()
    access = json.loads(line)
    assert access["logger"] == "llm_sidecar.access" and access["status"] == 404
    assert "message" not in access  # an access line, not an event whose message is the text


def test_close_writes_what_is_queued_and_puts_back_the_root_handlers() -> None:
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    out = io.StringIO()
    handle = configure_logging(LogConfig(level="debug"), out)
    assert root.handlers != before and root.level == logging.DEBUG
    for i in range(1000):
        logging.getLogger("llm_sidecar.test").debug("line %d", i)
    handle.close()
    handle.close()  # idempotent
    assert len(out.getvalue().splitlines()) == 1000
    assert root.handlers == before and root.level == level


def test_the_queue_is_bounded_but_takes_its_stop_mark() -> None:
    q = LogQueue(2)
    for i in range(5):
        q.put_nowait(i)
    assert len(q) == 2 and q.dropped == 3
    q.put_sentinel(None)
    assert [q.get(), q.get(), q.get()] == [0, 1, None]
    with pytest.raises(ValueError, match="≥ 1"):
        LogQueue(0)
