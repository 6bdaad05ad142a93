"""An access line from its entry, in the log thread: the fields (:func:`access_fields`), the text
form (:func:`access_text`), and the entry's shape that :mod:`proxy.access_log` makes on the loop.
The JSON form is ``orjson.dumps(access_fields(...))`` (proxy/logs.py)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any, Final

import orjson

from proxy.usage import USAGE_KEY, Tokens, Usage, tokens_in

ACCESS_LOGGER: Final = "llm_sidecar.access"
MAX_BODY_LOGGED: Final = 64 * 1024  # log.bodies: each body is cut here, with a marker
USAGE_AT: Final = 10  # AccessEntry's usage source
CACHE_KEY: Final = "cache"  # ctx.extra: the cache's result for this request (hit, miss, …)

# (wall time, ctx, method, path, route, status, error_type, outcome, bytes in, bytes out,
#  usage source (the answer, its last two chunks, or the Tokens read from them), first chunk time,
#  end time, request body, response body):
# references and numbers put together on the loop, read in the log thread by access_fields.
AccessEntry = tuple[Any, ...]
AccessSink = Callable[[AccessEntry], object]  # (what it returns is not used)

log = logging.getLogger(ACCESS_LOGGER)


def access_fields(entry: AccessEntry, stamp: str | None = None) -> dict[str, Any]:
    """The fields of an access line, in order: ``time`` (``stamp``), ``level``, ``logger``, then the
    request's; the optional ones (error_type, outcome, tokens, ttft_ms, cache, bodies) only when
    they have a value."""
    (
        _,
        ctx,
        method,
        path,
        route,
        status,
        error_type,
        outcome,
        bytes_in,
        bytes_out,
        usage_source,
        first_chunk,
        end,
        body_in,
        body_out,
    ) = entry
    target = ctx.target
    started = ctx.started
    fields: dict[str, Any] = {
        "time": stamp,
        "level": "info",
        "logger": ACCESS_LOGGER,
        "request_id": ctx.request_id.decode("latin-1"),
        "client": ctx.client,
        "method": method,
        "path": path,
        "route": route,
        "tenant": ctx.tenant,
        "identity": ctx.identity,
        "upstream": None if target is None else target.upstream,
        "model": None if target is None else target.model,
        "status": status,
    }
    if error_type is not None:
        fields["error_type"] = error_type
    if outcome is not None:
        fields["outcome"] = outcome
    fields["bytes_in"] = bytes_in
    fields["bytes_out"] = bytes_out
    extra = ctx._extra or _NO_EXTRA  # read, not made: this thread must not write to the request
    usage = extra.get(USAGE_KEY)
    if isinstance(usage, Usage):
        fields["tokens_in"] = usage.prompt_tokens
        fields["tokens_out"] = usage.completion_tokens
    elif usage_source is not None:  # (Tokens: read already, by the metrics)
        tokens = usage_source if type(usage_source) is Tokens else tokens_in(usage_source)
        if tokens is not None:
            fields["tokens_in"], fields["tokens_out"] = tokens.prompt, tokens.completion
    if first_chunk >= 0:
        fields["ttft_ms"] = _ms(first_chunk - started)
    fields["duration_ms"] = _ms(end - started)
    fields["attempts"] = ctx.attempt + 1
    cache = extra.get(CACHE_KEY)
    if cache is not None:
        fields["cache"] = cache
    if body_in is not None:
        fields["request_body"] = _clip(body_in, bytes_in)
    if body_out is not None:
        fields["response_body"] = _clip(bytes(body_out), bytes_out)
    return fields


_NO_EXTRA: Final[dict[str, Any]] = {}


def _ms(seconds: float) -> float:
    """Milliseconds to the µs (``round(x, 3)`` costs three times as much, once per line)."""
    return int(seconds * 1e6 + 0.5) / 1000 if seconds >= 0 else -int(-seconds * 1e6 + 0.5) / 1000


def access_text(fields: dict[str, Any]) -> str:
    """The text form: ``<request id> <client> "<METHOD> <path>" <status> <upstream/model> <ms>ms``
    (``-`` when the sidecar answered), then ``key=value`` for the other fields that have one."""
    upstream = fields["upstream"]
    served_by = f"{upstream}/{fields['model']}" if upstream is not None else "-"
    parts = [
        f'{fields["request_id"]} {fields["client"]} "{fields["method"]} {fields["path"]}"'
        f" {fields['status']} {served_by} {fields['duration_ms']:.1f}ms"
    ]
    for key, value in fields.items():
        if value is not None and key not in _IN_HEAD:
            if isinstance(value, str) and (not value or _NEEDS_QUOTES.search(value) is not None):
                value = orjson.dumps(value).decode()
            parts.append(f"{key}={value}")
    return " ".join(parts)


_IN_HEAD: Final = frozenset(
    {
        "time",
        "level",
        "logger",
        "request_id",
        "client",
        "method",
        "path",
        "status",
        "upstream",
        "model",
        "duration_ms",
    }
)
_NEEDS_QUOTES: Final = re.compile(r'[\s"=\\]')


def _clip(body: bytes, total: int) -> str:
    text = body[:MAX_BODY_LOGGED].decode("utf-8", "replace")
    if total > MAX_BODY_LOGGED:
        text += f"…[{total - MAX_BODY_LOGGED} more bytes]"
    return text


class _LazyText:
    """The message of an access record made without proxy.logs: built only if a handler formats it."""

    __slots__ = ("entry",)

    def __init__(self, entry: AccessEntry) -> None:
        self.entry = entry

    def __str__(self) -> str:
        return access_text(access_fields(self.entry))


def log_record_sink(entry: AccessEntry) -> None:
    """Without a :class:`proxy.logs.LogHandle`: a record of the ``llm_sidecar.access`` logger,
    whatever ``log.level`` (``access_log`` is its own switch); ``record.access`` is the entry."""
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 0, _LazyText(entry), None, None)
    record.access = entry
    log.handle(record)
