"""What a request is likely to cost in tokens, decided before it is forwarded; cheap by design.

Prompt: the characters of its text (messages, prompt, input, tools, instructions) divided by
``chars_per_token``; token-id prompts count one per id; images, audio and files are not counted.
Completion: ``max_completion_tokens`` / ``max_tokens`` / ``max_output_tokens``, else the configured
default, times ``n``. The difference to the real usage is settled when the response ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, TypeGuard

from proxy.http import Request

GENERATING_PATHS: Final = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})
STREAM_USAGE_PATHS: Final = frozenset({"/v1/chat/completions", "/v1/completions"})
_PROMPT_FIELDS: Final = frozenset(
    {"messages", "prompt", "input", "tools", "functions", "instructions", "system"}
)
_NOT_TEXT: Final = frozenset({"image_url", "input_audio", "audio", "file", "image", "file_data", "video_url"})
_MAX_FIELDS: Final = ("max_completion_tokens", "max_tokens", "max_output_tokens")


@dataclass(slots=True)  # not frozen: one per request, built cheaply (see bucket.Decision)
class Estimate:
    prompt: int
    completion: int

    @property
    def total(self) -> int:
        return self.prompt + self.completion


def estimate(data: dict[str, Any], path: str, chars_per_token: float, default_max_tokens: int) -> Estimate:
    chars, ids = 0, 0
    for name, value in data.items():  # a few fields: cheaper than looking up each prompt field
        if name in _PROMPT_FIELDS:
            if type(value) is str:
                chars += len(value)
            elif value is not None:
                c, i = _text(value)
                chars += c
                ids += i
    prompt = math.ceil(chars / chars_per_token) + ids
    if path not in GENERATING_PATHS:
        return Estimate(prompt, 0)
    limit = default_max_tokens
    for name in _MAX_FIELDS:
        value = data.get(name)
        if value is not None and _positive_int(value):
            limit = value
            break
    n = data.get("n")
    return Estimate(prompt, limit if n is None else limit * (n if _positive_int(n) else 1))


def ask_for_stream_usage(request: Request, data: dict[str, Any]) -> bool:
    """For a stream whose client did not ask for usage, ask the backend for it (the usage chunk
    is then hidden from the client). True when the request was changed so."""
    if data.get("stream") is not True or request.path not in STREAM_USAGE_PATHS:
        return False
    options = data.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return False
    extra = options if isinstance(options, dict) else {}
    request.set_json({**data, "stream_options": {**extra, "include_usage": True}})
    return True


def _text(value: Any) -> tuple[int, int]:
    """(characters of text, token ids) in a JSON value, skipping binary parts. A loop, not recursion,
    and exact type checks first (JSON gives exact types): this runs on every request."""
    chars, ids = 0, 0
    todo = [value]
    while todo:
        item = todo.pop()
        kind = type(item)
        if kind is str:
            chars += len(item)
        elif kind is dict:
            for key, inner in item.items():
                if key not in _NOT_TEXT:
                    if type(inner) is str:
                        chars += len(inner)
                    else:
                        todo.append(inner)
        elif kind is list:
            todo.extend(item)
        elif kind is int:
            ids += 1
        # else: bool, float or None (JSON has no other types)
    return chars, ids


def _positive_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
