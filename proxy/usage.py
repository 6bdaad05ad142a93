"""LLM token usage as OpenAI-compatible backends report it (``"usage"`` of a response or stream chunk)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


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
