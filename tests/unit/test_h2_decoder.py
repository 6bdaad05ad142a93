"""The HPACK decoder of the HTTP/2 front (proxy/server/h2_decoder.py), checked against hpack's own."""

from __future__ import annotations

import random

import pytest
from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKDecodingError, InvalidTableSizeError, OversizedHeaderListError

from proxy.server.h2_decoder import HUFFMAN_CACHE_ENTRIES, FastDecoder

NAMES = [b":method", b":path", b":authority", b"content-type", b"authorization", b"x-request-id",
         b"user-agent", b"x-" + b"n" * 150, b"accept", b"cookie"]  # fmt: skip


def _random_headers(rng: random.Random) -> list[HeaderTuple]:
    out: list[HeaderTuple] = []
    for _ in range(rng.randint(1, 12)):
        name = rng.choice(NAMES)
        value = bytes(rng.choice(b"abcxyz019/-_ ") for _ in range(rng.choice((0, 1, 5, 30, 200, 3000))))
        kind = NeverIndexedHeaderTuple if rng.random() < 0.2 else HeaderTuple
        out.append(kind(name, value))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_it_decodes_what_hpack_encodes_exactly_as_hpack_decodes_it(seed: int) -> None:
    """Many blocks on one connection: indexed fields, both literal kinds, Huffman or not, long
    integers, entries evicted from a small table, and table size updates."""
    rng = random.Random(seed)
    encoder, ours, theirs = Encoder(), FastDecoder(), Decoder()
    for size in (4096, 256, 0, 1024):
        ours.max_allowed_table_size = theirs.max_allowed_table_size = 4096
        encoder.header_table_size = size
        for _ in range(30):
            block = encoder.encode(_random_headers(rng), huffman=rng.random() < 0.7)
            assert ours.decode(block, raw=True) == [tuple(h) for h in theirs.decode(block, raw=True)]
            assert list(ours._dynamic) == list(theirs.header_table.dynamic_entries)
            assert ours.header_table_size == theirs.header_table_size


@pytest.mark.parametrize(
    "block",
    [
        b"\x80",  # index 0
        b"\xbf",  # index 62: beyond an empty dynamic table
        b"\xff\x80\x80\x80\x80\x80\x80\x01",  # an integer that never ends
        b"\xff",  # an integer cut short
        b"\x40\x05ab",  # a literal name cut short
        b"\x00\x01a\x05xy",  # a value cut short
        b"\x00\x01a",  # no value at all
        b"\x82\x3f\xe1\x1f",  # a table size update after a field
        b"\x3f\xe2\x1f",  # a table size update above the allowed maximum
        b"\x00\x81\xff\x00",  # a Huffman string that is not one (EOS padding)
    ],
)
def test_broken_blocks_raise_hpack_errors(block: bytes) -> None:
    with pytest.raises(HPACKDecodingError):
        Decoder().decode(block, raw=True)
    with pytest.raises(HPACKDecodingError):
        FastDecoder().decode(block, raw=True)


def test_a_header_list_over_the_limit_is_refused() -> None:
    block = Encoder().encode([(b"x-a", b"v" * 100), (b"x-b", b"v" * 100)])
    decoder = FastDecoder(max_header_list_size=200)
    with pytest.raises(OversizedHeaderListError):
        decoder.decode(block, raw=True)
    assert len(FastDecoder(max_header_list_size=300).decode(block, raw=True)) == 2


def test_a_table_the_encoder_did_not_shrink_after_settings_is_refused() -> None:
    encoder, decoder = Encoder(), FastDecoder()
    decoder.decode(encoder.encode([(b"x-a", b"1")]), raw=True)
    decoder.max_allowed_table_size = 100  # our SETTINGS_HEADER_TABLE_SIZE, acknowledged
    with pytest.raises(InvalidTableSizeError):
        decoder.decode(encoder.encode([(b"x-b", b"2")]), raw=True)  # no size update came first


def test_the_huffman_cache_stays_bounded_and_keeps_answers_right() -> None:
    encoder, decoder = Encoder(), FastDecoder()
    for i in range(10 * HUFFMAN_CACHE_ENTRIES):
        headers = [NeverIndexedHeaderTuple(b":path", b"/v1/chat/completions/%d" % i),
                   NeverIndexedHeaderTuple(b"x-long", b"y" * 500 + b"%d" % i)]  # fmt: skip
        assert decoder.decode(encoder.encode(headers, huffman=True), raw=True) == [tuple(h) for h in headers]
        assert len(decoder._cache) <= HUFFMAN_CACHE_ENTRIES
    assert all(len(encoded) <= 64 for encoded in decoder._cache)
