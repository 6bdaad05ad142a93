"""RESP2, the Redis wire protocol, as the rate limiter needs it: commands encoded, replies parsed.

Commands are arrays of bulk strings (``encode``). Replies: ``+simple`` → bytes, ``-error`` → a
``redis.exceptions.ResponseError`` (the subclass redis-py would raise: NoScriptError, TryAgainError,
BusyLoadingError…), returned, not raised: the other replies of a batch stay usable; ``:integer`` →
int, ``$bulk`` → bytes (``$-1`` → None), ``*array`` → list (``*-1`` → None).

``ReplyParser`` has the shape of ``hiredis.Reader`` (``feed``, then ``gets`` until it answers
False), a few dozen lines of Python: the replies of the two script calls are short (a bulk string of
six numbers, an integer), and parsing them is a small part of a round trip next to its two system
calls (measured in bench/README.md's rate-limit notes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Final

from redis.exceptions import (
    AskError,
    AuthenticationError,
    BusyLoadingError,
    ClusterCrossSlotError,
    ClusterDownError,
    ExecAbortError,
    InvalidResponse,
    MasterDownError,
    MovedError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

CRLF: Final = b"\r\n"
NOT_YET: Final = False  # gets(): no complete reply buffered (as hiredis.Reader answers)


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


def encode(args: Sequence[bytes]) -> bytes:
    """One command: an array of bulk strings."""
    return b"*%d\r\n%b" % (len(args), b"".join(bulk(a) for a in args))


# An error reply's first word → the redis.exceptions class redis-py raises for it (a ResponseError,
# or for LOADING and the auth errors a ConnectionError). redis-py's own table lives in a private
# module (redis._parsers): the prefixes are Redis's, so they are listed here.
ERRORS: Final[Mapping[str, type[RedisError]]] = MappingProxyType(
    {
        "NOSCRIPT": NoScriptError,
        "LOADING": BusyLoadingError,
        "READONLY": ReadOnlyError,
        "EXECABORT": ExecAbortError,
        "OOM": OutOfMemoryError,
        "NOAUTH": AuthenticationError,
        "WRONGPASS": AuthenticationError,
        "NOPERM": NoPermissionError,
        "TRYAGAIN": TryAgainError,
        "MOVED": MovedError,
        "ASK": AskError,
        "CLUSTERDOWN": ClusterDownError,
        "CROSSSLOT": ClusterCrossSlotError,
        "MASTERDOWN": MasterDownError,
    }
)


def error(message: bytes) -> RedisError:
    """The exception redis-py would raise for this error reply, by its first word."""
    text = message.decode(errors="replace")
    code, _, rest = text.partition(" ")
    kind = ERRORS.get(code)
    return ResponseError(text) if kind is None else kind(rest)


class ReplyParser:
    """Bytes in (``feed``), whole replies out (``gets``, ``False`` while none is complete)."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            self._buf = self._buf[self._pos :] + data
            self._pos = 0
        else:
            self._buf += data

    def gets(self) -> Any:
        """The next complete reply, or False (nothing is consumed until a whole reply is there)."""
        if self._pos >= len(self._buf):
            return NOT_YET
        try:
            reply, self._pos = self._parse(self._pos)
        except IndexError:  # incomplete
            return NOT_YET
        except ValueError:  # a length or an integer that is not a number
            raise InvalidResponse("Protocol error: a length or integer that is not a number") from None
        if self._pos == len(self._buf):
            self._buf, self._pos = b"", 0
        return reply

    def _parse(self, pos: int) -> tuple[Any, int]:
        buf = self._buf
        end = buf.find(CRLF, pos)
        if end < 0:
            raise IndexError
        kind, line = buf[pos], buf[pos + 1 : end]
        pos = end + 2
        if kind == 36:  # $ bulk string
            size = int(line)
            if size < 0:
                return None, pos
            if len(buf) < pos + size + 2:
                raise IndexError
            return buf[pos : pos + size], pos + size + 2
        if kind == 58:  # : integer
            return int(line), pos
        if kind == 43:  # + simple string
            return line, pos
        if kind == 45:  # - error
            return error(line), pos
        if kind == 42:  # * array
            count = int(line)
            if count < 0:
                return None, pos
            items = []
            for _ in range(count):
                item, pos = self._parse(pos)
                items.append(item)
            return items, pos
        raise InvalidResponse(f"Protocol error: a reply starting {buf[end - len(line) - 1 : end]!r}")
