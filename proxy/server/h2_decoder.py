"""An HPACK decoder for the HTTP/2 front's request headers (RFC 7541), in one tight loop.

hpack's ``Decoder`` does what this does, but spends most of its time around the work: a memoryview
slice, a method call, a ``HeaderTuple`` and a ``log.debug`` per field, and a pure-Python Huffman
decoder that costs some 15 µs for a 20-byte ``:path``. Clients send the same few Huffman-coded
literals on every request of a connection (nghttp2 never indexes ``:path`` or ``content-length``;
other clients leave sensitive or large values unindexed), so decoded strings are kept in a small
per-connection cache keyed by their encoded bytes (a pure function: a hit is always right), bounded
in entries and in the size of what it keeps.

It stands in for ``H2Connection.decoder`` (h2 calls ``decode(block, raw=True)`` and sets
``max_header_list_size`` and ``max_allowed_table_size``) and raises hpack's own exceptions, so h2
turns them into the same connection errors (``OversizedHeaderListError`` → ENHANCE_YOUR_CALM via
h2's DenialOfServiceError, the others → COMPRESSION_ERROR, see proxy/server/h2.py). Fields come back
as plain ``(name, value)`` tuples of bytes; the never-indexed flag is not kept (the front does not
re-encode request headers with HPACK state of its own). tests/unit/test_h2_decoder.py checks it
against hpack's decoder on random and broken blocks.
"""

from __future__ import annotations

from collections import deque

from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndexError,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

_STATIC = HeaderTable.STATIC_TABLE
_STATIC_LEN = len(_STATIC)
_ENTRY_OVERHEAD = 32  # RFC 7541 §4.1
_MAX_CONTINUATION = 5  # bytes after an integer's prefix: 35 bits, far above any table or length limit
HUFFMAN_CACHE_ENTRIES = 64
HUFFMAN_CACHE_MAX_BYTES = 64  # encoded strings longer than this are decoded every time


class FastDecoder:
    """Drop-in for ``hpack.Decoder`` as h2 uses it, for one connection."""

    __slots__ = ("_cache", "_dynamic", "_maxsize", "_size", "max_allowed_table_size", "max_header_list_size")

    def __init__(self, max_header_list_size: int = 65536) -> None:
        self._dynamic: deque[tuple[bytes, bytes]] = deque()
        self._size = 0
        self._maxsize = 4096
        self.max_allowed_table_size = 4096
        self.max_header_list_size = max_header_list_size
        self._cache: dict[bytes, bytes] = {}

    @property
    def header_table_size(self) -> int:
        return self._maxsize

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._maxsize = value
        self._shrink()

    def _shrink(self) -> None:
        dynamic = self._dynamic
        size = self._size
        while size > self._maxsize and dynamic:
            name, value = dynamic.pop()
            size -= _ENTRY_OVERHEAD + len(name) + len(value)
        self._size = size

    def _add(self, name: bytes, value: bytes) -> None:
        size = _ENTRY_OVERHEAD + len(name) + len(value)
        if size > self._maxsize:
            self._dynamic.clear()
            self._size = 0
            return
        self._dynamic.appendleft((name, value))
        self._size += size
        if self._size > self._maxsize:
            self._shrink()

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= _STATIC_LEN:
            return _STATIC[index - 1]
        index -= _STATIC_LEN + 1
        if 0 <= index < len(self._dynamic):
            return self._dynamic[index]
        raise InvalidTableIndexError(f"invalid table index {index + _STATIC_LEN + 1}")

    def decode(self, data: bytes, raw: bool = True) -> list[tuple[bytes, bytes]]:
        """The fields of one complete header block, in order (``raw`` must be true: bytes out)."""
        if not raw:
            raise ValueError("FastDecoder only decodes to bytes (raw=True)")
        try:
            return self._decode(data)
        except IndexError as e:  # ran off the end of the block inside an integer
            raise HPACKDecodingError("truncated header block") from e

    def _decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = []
        end = len(data)
        pos = 0
        inflated = 0
        limit = self.max_header_list_size
        string = self._string
        dynamic = self._dynamic
        while pos < end:
            first = data[pos]
            pos += 1
            if first & 0x80:  # indexed field (§6.1)
                index = first & 0x7F
                if index == 0x7F:
                    index, pos = _integer(data, pos, index)
                if 0 < index <= _STATIC_LEN:
                    header = _STATIC[index - 1]
                elif _STATIC_LEN < index <= _STATIC_LEN + len(dynamic):
                    header = dynamic[index - _STATIC_LEN - 1]
                else:
                    header = self._entry(index)  # raises
            elif first & 0xE0 == 0x20:  # dynamic table size update (§6.3), only before the first field
                if headers:
                    raise HPACKDecodingError("table size update not at the start of the block")
                size = first & 0x1F
                if size == 0x1F:
                    size, pos = _integer(data, pos, size)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("encoder exceeded the allowed table size")
                self.header_table_size = size
                continue
            else:  # a literal: with incremental indexing (§6.2.1), without or never indexed (§6.2.2-3)
                indexing = first & 0x40
                mask = 0x3F if indexing else 0x0F
                index = first & mask
                if index == mask:
                    index, pos = _integer(data, pos, index)
                if index:
                    name = _STATIC[index - 1][0] if index <= _STATIC_LEN else self._entry(index)[0]
                else:
                    name, pos = string(data, pos)
                value, pos = string(data, pos)
                header = (name, value)
                if indexing:
                    self._add(name, value)
            headers.append(header)
            inflated += _ENTRY_OVERHEAD + len(header[0]) + len(header[1])
            if inflated > limit:
                raise OversizedHeaderListError(f"a header list larger than {limit} bytes")
        if self._maxsize > self.max_allowed_table_size:
            raise InvalidTableSizeError("encoder did not shrink the table to within the maximum")
        return headers

    def _string(self, data: bytes, pos: int) -> tuple[bytes, int]:
        """A string literal (§5.2) at ``pos``: its bytes (Huffman-decoded) and the position after it."""
        first = data[pos]
        length = first & 0x7F
        pos += 1
        if length == 0x7F:
            length, pos = _integer(data, pos, length)
        stop = pos + length
        if stop > len(data):
            raise HPACKDecodingError("truncated header block")
        raw = data[pos:stop]
        if not first & 0x80:
            return raw, stop
        cache = self._cache
        decoded = cache.get(raw)
        if decoded is None:
            decoded = decode_huffman(raw)
            if length <= HUFFMAN_CACHE_MAX_BYTES:
                if len(cache) >= HUFFMAN_CACHE_ENTRIES:
                    cache.clear()
                cache[raw] = decoded
        return decoded, stop


def _integer(data: bytes, pos: int, value: int) -> tuple[int, int]:
    """The continuation bytes of an integer whose prefix was all ones (§5.1)."""
    shift = 0
    for _ in range(_MAX_CONTINUATION):
        byte = data[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise HPACKDecodingError("integer representation too long")
