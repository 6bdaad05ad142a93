"""LLM token usage as OpenAI-compatible backends report it (``"usage"`` of a response or stream chunk)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import orjson

MAX_USAGE_BODY: Final = 1024 * 1024  # a whole answer up to this size is read for its usage
# ctx.extra: a Usage that a middleware read (the access log and the metrics take it, no second parse)
USAGE_KEY: Final = "usage"


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def usage_of(payload: Any) -> Usage | None:
    """The ``usage`` of a parsed response body or chunk, or None when it has none (or a bad one)."""
    if not isinstance(payload, dict):
        return None
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _count(usage.get("completion_tokens", usage.get("output_tokens")))
    total = _count(usage.get("total_tokens"))
    if total is None:
        if prompt is None and completion is None:
            return None
        total = (prompt or 0) + (completion or 0)
    return Usage(prompt or 0, completion or 0, total)


def usage_of_json(body: bytes) -> Usage | None:
    """The ``usage`` of a complete JSON response body, or None (not JSON, no usage)."""
    if b'"usage"' not in body:
        return None
    try:
        return usage_of(orjson.loads(body))
    except orjson.JSONDecodeError:
        return None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class Tokens:
    """An answer's token counts as :func:`tokens_in` read them (None: the answer did not say).
    A plain slotted class: made once per answer on the request path, where a NamedTuple's or a
    frozen dataclass's constructor costs several times more."""

    __slots__ = ("completion", "prompt")

    def __init__(self, prompt: int | None, completion: int | None) -> None:
        self.prompt = prompt
        self.completion = completion

    def __repr__(self) -> str:
        return f"Tokens(prompt={self.prompt}, completion={self.completion})"


def tokens_in(source: bytes | tuple[bytes, bytes]) -> Tokens | None:
    """(prompt, completion) tokens of a whole answer (``bytes``), or of the last two chunks of a
    streamed one: an SSE stream's last ``usage`` event (a ``data:`` line); a JSON answer's
    top-level ``usage``. Of a JSON answer only the ``usage`` member is parsed when it and what
    follows close the top-level object (one ``}`` more than ``{`` from it to the end: it is not
    nested), else the whole answer."""
    tail = source if isinstance(source, bytes) else source[0] + source[1]
    at = tail.rfind(b'"usage"')
    if at < 0:
        return None
    start = tail.rfind(b"\n", 0, at) + 1
    if tail.startswith(b"data:", start):  # an SSE event
        stop = tail.find(b"\n", at)
        return _counts(tail[start + 5 : stop if stop >= 0 else len(tail)])
    rest = tail[at:]
    if rest.count(b"{") + 1 == rest.count(b"}"):
        counts = _counts(b"{" + rest)
        if counts is not None:
            return counts
    return _counts(source) if isinstance(source, bytes) else None


def _counts(data: bytes) -> Tokens | None:
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    usage = payload.get("usage") if type(payload) is dict else None
    if type(usage) is not dict:
        return None
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if prompt is None and completion is None:  # the Responses API's names
        prompt, completion = usage.get("input_tokens"), usage.get("output_tokens")
    # (exact type checks: bool is an int; JSON gives int, float, str, … as they are)
    return Tokens(
        prompt if type(prompt) is int and prompt >= 0 else None,
        completion if type(completion) is int and completion >= 0 else None,
    )
