"""middleware/rate_limit/resp.py: RESP2 commands encoded, replies parsed however the bytes arrive."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    InvalidResponse,
    NoScriptError,
    ResponseError,
    TryAgainError,
)

from middleware.rate_limit.resp import ERRORS, NOT_YET, ReplyParser, encode, error

STREAM = (
    b"$15\r\n0 5 12 99 100 0\r\n"  # an admission's answer
    b":1\r\n"  # a settlement's
    b"+OK\r\n"
    b"$-1\r\n"
    b"$0\r\n\r\n"
    b"*3\r\n:1\r\n*1\r\n$2\r\nab\r\n*-1\r\n"
    b"-NOSCRIPT No matching script. Please use EVAL.\r\n"
    b":-42\r\n"
)
EXPECTED: list[Any] = [b"0 5 12 99 100 0", 1, b"OK", None, b"", [1, [b"ab"], None], NoScriptError, -42]


def drain(parser: ReplyParser) -> list[Any]:
    out = []
    while (reply := parser.gets()) is not NOT_YET:
        out.append(reply)
    return out


def comparable(replies: list[Any]) -> list[Any]:
    """Exceptions by their class (two instances never compare equal)."""
    return [type(r) if isinstance(r, Exception) else r for r in replies]


def test_encode_is_an_array_of_bulk_strings() -> None:
    assert encode([b"EVALSHA", b"ab", b"0"]) == b"*3\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n0\r\n"


def test_every_reply_shape_in_one_read() -> None:
    parser = ReplyParser()
    parser.feed(STREAM)
    replies = drain(parser)
    assert comparable(replies) == EXPECTED
    assert str(replies[6]) == "No matching script. Please use EVAL."


@pytest.mark.parametrize("size", [1, 2, 3, 7])
def test_replies_split_anywhere_come_out_whole_and_in_order(size: int) -> None:
    parser = ReplyParser()
    replies: list[Any] = []
    for start in range(0, len(STREAM), size):
        parser.feed(STREAM[start : start + size])
        replies += drain(parser)
    assert comparable(replies) == EXPECTED


def test_nothing_is_consumed_until_a_reply_is_whole() -> None:
    parser = ReplyParser()
    parser.feed(b"$5\r\nhel")
    assert parser.gets() is NOT_YET
    parser.feed(b"lo\r")
    assert parser.gets() is NOT_YET
    parser.feed(b"\n:7")
    assert parser.gets() == b"hello"
    assert parser.gets() is NOT_YET
    parser.feed(b"\r\n")
    assert parser.gets() == 7
    assert parser.gets() is NOT_YET


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        (b"-NOSCRIPT No matching script.", NoScriptError),
        (b"-TRYAGAIN Multiple keys request during rehashing of slot", TryAgainError),
        (b"-CLUSTERDOWN The cluster is down", ClusterDownError),
        (b"-LOADING Redis is loading the dataset in memory", BusyLoadingError),
        (b"-BUSY Redis is busy running a script.", ResponseError),
        (b"-ERR Error running script", ResponseError),
    ],
)
def test_error_replies_are_redis_py_exceptions_returned_not_raised(line: bytes, kind: type) -> None:
    parser = ReplyParser()
    parser.feed(line + b"\r\n")
    reply = parser.gets()
    assert type(reply) is kind
    assert isinstance(reply, ResponseError | BusyLoadingError)


@pytest.mark.parametrize("reply", [b"%1\r\n", b"$abc\r\n", b":1x\r\n", b"*two\r\n"])
def test_a_reply_of_an_unknown_kind_or_a_bad_number_is_a_protocol_error(reply: bytes) -> None:
    parser = ReplyParser()
    parser.feed(reply)
    with pytest.raises(InvalidResponse):
        parser.gets()


def test_error_classes_agree_with_redis_py() -> None:
    """Our table of error prefixes picks the class redis-py's own parser picks (a private module of
    redis-py, read here only to check against, never by the product)."""
    from redis._parsers.base import BaseParser

    for code in ERRORS:
        message = f"{code} 3999 127.0.0.1:6381"  # (MOVED and ASK carry a slot and an address)
        ours = error(message.encode())
        theirs = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
        assert type(ours) is type(theirs), code
    assert type(error(b"ERR unknown command")) is ResponseError


def test_the_product_imports_no_private_module_of_a_library() -> None:
    root = Path(__file__).resolve().parents[2]
    private = re.compile(r"^\s*(?:from|import)\s+(?!proxy|middleware)\w+\._\w*", re.M)
    offenders = [
        str(path.relative_to(root))
        for folder in ("proxy", "middleware")
        for path in (root / folder).rglob("*.py")
        if private.search(path.read_text())
    ]
    assert not offenders
