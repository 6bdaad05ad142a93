"""A stateless HPACK encoder (RFC 7541): the front's response headers and the upstream pool's
request headers.

hpack's own encoder searches its tables linearly and Huffman-codes every string, in Python: that
was the largest cost of a small HTTP/2 response. Response headers here are few and mostly differ
per response (ids, dates, lengths), so a dynamic table buys little. This encoder uses only the
static table: a name it holds is sent by index, every value (and any other name) as a literal
"without indexing", not Huffman-coded. With no dynamic table there is no state to keep in step
with the peer, so the first block of a connection just says so (a table size update to 0), and
whatever SETTINGS_HEADER_TABLE_SIZE the client sends changes nothing.

It stands in for ``H2Connection.encoder``: h2 calls ``encode(headers)`` and sets
``header_table_size``.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack.table import HeaderTable

_TABLE_SIZE_ZERO = b"\x20"  # dynamic table size update (001xxxxx) to 0


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """RFC 7541 §5.1: ``value`` with an N-bit prefix, ``first`` holding the bits above it."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _tables() -> tuple[dict[bytes, bytes], dict[tuple[bytes, bytes], bytes]]:
    names: dict[bytes, bytes] = {}
    fields: dict[tuple[bytes, bytes], bytes] = {}
    for index, (name, value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
        # Literal without indexing, indexed name: 0000xxxx with a 4-bit prefix.
        names.setdefault(name, _integer(index, 4, 0x00))
        if value:
            fields[(name, value)] = _integer(index, 7, 0x80)  # indexed field: 1xxxxxxx
    return names, fields


_NAMES, _FIELDS = _tables()
# Short values (< 127 bytes) are the rule: their length prefix is one byte.
_LENGTH = [bytes([n]) for n in range(127)]


class StaticEncoder:
    """Drop-in for ``hpack.Encoder`` as h2 uses it, for one connection.

    The encoded form of a field is a pure function of it, so fields that repeat on a connection
    (content-type, server, the date within its second) are kept, encoded, in a small cache:
    ``CACHE_ENTRIES`` at most, values up to ``CACHE_VALUE_BYTES``, emptied when full; the request id
    (new every response) is never kept."""

    __slots__ = ("_cache", "_first", "header_table_size")

    def __init__(self) -> None:
        self.header_table_size = 4096  # set by h2 from the peer's SETTINGS; nothing depends on it
        self._first = True
        self._cache: dict[tuple[bytes, bytes], bytes] = {}

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        parts: list[bytes] = []
        if self._first:
            self._first = False
            parts.append(_TABLE_SIZE_ZERO)
        cache = self._cache
        for field in headers:
            known = cache.get(field)
            if known is None:
                known = _field(*field)
                name, value = field
                if len(value) <= CACHE_VALUE_BYTES and name != b"x-request-id":
                    if len(cache) >= CACHE_ENTRIES:
                        cache.clear()
                    cache[(name, value)] = known
            parts.append(known)
        return b"".join(parts)


CACHE_ENTRIES = 64
CACHE_VALUE_BYTES = 128


def _field(name: bytes, value: bytes) -> bytes:
    """One field: indexed when the static table holds it whole, else a literal without indexing
    (name by index when the static table knows it), never Huffman-coded."""
    whole = _FIELDS.get((name, value))
    if whole is not None:
        return whole
    head = _NAMES.get(name)
    if head is None:
        name = name.lower()
        head = _NAMES.get(name)
    size = len(value)
    length = _LENGTH[size] if size < 127 else _integer(size, 7, 0x00)
    if head is None:
        size = len(name)
        return b"".join(
            (b"\x00", _LENGTH[size] if size < 127 else _integer(size, 7, 0x00), name, length, value)
        )
    return b"".join((head, length, value))
