"""A stateless HPACK encoder for the HTTP/2 front's response headers (RFC 7541).

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
    """Drop-in for ``hpack.Encoder`` as h2 uses it, for one connection."""

    __slots__ = ("_first", "header_table_size")

    def __init__(self) -> None:
        self.header_table_size = 4096  # set by h2 from the peer's SETTINGS; nothing depends on it
        self._first = True

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        parts: list[bytes] = []
        if self._first:
            self._first = False
            parts.append(_TABLE_SIZE_ZERO)
        names, fields, lengths = _NAMES, _FIELDS, _LENGTH
        for name, value in headers:
            whole = fields.get((name, value))
            if whole is not None:
                parts.append(whole)
                continue
            head = names.get(name)
            if head is None:
                name = name.lower()
                head = names.get(name)
            if head is None:
                size = len(name)
                parts.append(b"\x00")
                parts.append(lengths[size] if size < 127 else _integer(size, 7, 0x00))
                parts.append(name)
            else:
                parts.append(head)
            size = len(value)
            parts.append(lengths[size] if size < 127 else _integer(size, 7, 0x00))
            parts.append(value)
        return b"".join(parts)
