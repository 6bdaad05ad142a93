"""The rate limiter's per-request shortcuts give what the plain way gives: the usage of an answer
(settle.json_total_tokens), reset headers (headers.reset_value) and the prompt estimate
(estimate._text, a loop) against a plain recursive count."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from middleware.rate_limit.estimate import _NOT_TEXT, _text
from middleware.rate_limit.headers import duration, reset_value
from middleware.rate_limit.settle import json_total_tokens
from proxy.usage import usage_of_json

ANSWER: dict[str, Any] = {
    "id": "chatcmpl-1",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": 'say "usage": {"total_tokens": 999}'}}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
}


def expected(body: bytes) -> int | None:
    usage = usage_of_json(body)
    return None if usage is None else usage.total_tokens


@pytest.mark.parametrize(
    "body",
    [
        orjson.dumps(ANSWER),
        json.dumps(ANSWER, indent=2).encode(),  # whitespace around the colons
        orjson.dumps({**ANSWER, "usage": {"prompt_tokens_details": {"cached_tokens": 1}, "total_tokens": 7}}),
        orjson.dumps({**ANSWER, "usage": {"input_tokens": 2, "output_tokens": 4}}),  # Responses API
        orjson.dumps({**ANSWER, "usage": {"prompt_tokens": 2, "completion_tokens": 4}}),
        orjson.dumps({**ANSWER, "usage": None}),
        orjson.dumps({k: v for k, v in ANSWER.items() if k != "usage"}),
        b'{"usage": {"total_tokens": 8',  # cut short: not JSON
        b"not json at all",
    ],
)
def test_usage_read_from_the_bytes_matches_the_parsed_answer(body: bytes) -> None:
    assert json_total_tokens(body) == expected(body)


def test_a_usage_the_answer_echoes_from_the_request_does_not_set_the_charge() -> None:
    # A Responses API answer repeats the client's tools: a "usage" inside them is the client's.
    tools = [{"type": "function", "name": "f", "parameters": {"usage": {"total_tokens": 0}}}]
    body = orjson.dumps({"tools": tools, "usage": {"input_tokens": 7000, "output_tokens": 1000}})
    assert json_total_tokens(body) == 8000


def test_an_answer_cut_short_has_no_usage() -> None:
    assert json_total_tokens(b'{"usage": {"total_tokens": 8}') is None  # the final brace is missing


def test_a_usage_quoted_in_the_content_is_not_read() -> None:
    body = orjson.dumps({k: v for k, v in ANSWER.items() if k != "usage"})
    assert b'\\"usage\\"' in body
    assert json_total_tokens(body) is None


@pytest.mark.parametrize(
    "seconds", [0.0, 1e-9, 0.0004, 0.001, 0.0199, 0.31, 0.999, 0.9995, 1.0, 1.5, 59.9, 360.0]
)
def test_reset_values_are_the_go_durations(seconds: float) -> None:
    assert reset_value(seconds) == duration(seconds).encode()


def reference_text(value: Any) -> tuple[int, int]:
    if isinstance(value, str):
        return len(value), 0
    if isinstance(value, bool) or not isinstance(value, int | list | dict):
        return 0, 0
    if isinstance(value, int):
        return 0, 1
    parts = value if isinstance(value, list) else [v for k, v in value.items() if k not in _NOT_TEXT]
    counts = [reference_text(v) for v in parts]
    return sum(c for c, _ in counts), sum(i for _, i in counts)


@pytest.mark.parametrize(
    "value",
    [
        "hello",
        [1, 2, 3, True, None, 1.5],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [{"type": "text", "text": "yo"}]},
        ],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:xyz"}}, "plain"]}],
        {"type": "function", "function": {"name": "f", "parameters": {"a": [1, {"b": "cc"}]}}},
        [[[["deep"]]], {"file": "skipped", "x": {"audio": "skipped", "y": "counted"}}],
    ],
)
def test_the_prompt_count_loop_matches_a_plain_recursive_count(value: Any) -> None:
    assert _text(value) == reference_text(value)
