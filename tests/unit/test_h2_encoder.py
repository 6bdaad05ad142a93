"""The stateless HPACK encoder of the HTTP/2 front, checked against hpack's own decoder."""

from __future__ import annotations

import pytest
from hpack import Decoder

from proxy.h2.hpack_encoder import StaticEncoder

RESPONSE = [
    (b":status", b"200"),
    (b"content-type", b"application/json"),
    (b"date", b"Mon, 23 Nov 2026 16:11:13 GMT"),
    (b"server", b"Python/3.11 aiohttp/3.14.5"),
    (b"x-request-id", b"f273ebe0ba1c-1"),
    (b"content-length", b"301"),
]


@pytest.mark.parametrize(
    "headers",
    [
        RESPONSE,
        [(b":status", b"404"), (b"content-type", b"application/json")],
        [(b":status", b"429"), (b"retry-after", b"2"), (b"x-ratelimit-remaining-requests", b"0")],
        [(b":status", b"200"), (b"x-long", b"v" * 5000), (b"x-" + b"n" * 300, b"")],
        [(b":status", b"503"), (b"set-cookie", b"a=b"), (b"set-cookie", b"c=d")],
    ],
)
def test_what_it_encodes_decodes_to_the_same_headers(headers: list[tuple[bytes, bytes]]) -> None:
    assert Decoder().decode(StaticEncoder().encode(headers), raw=True) == headers


def test_many_blocks_on_one_connection_leave_the_dynamic_table_empty() -> None:
    encoder, decoder = StaticEncoder(), Decoder()
    for i in range(50):
        headers = [*RESPONSE, (b"x-n", b"%d" % i)]
        assert decoder.decode(encoder.encode(headers), raw=True) == headers
    assert len(decoder.header_table.dynamic_entries) == 0


def test_it_keeps_to_a_peer_with_no_dynamic_table() -> None:
    encoder, decoder = StaticEncoder(), Decoder(max_header_list_size=65536)
    decoder.max_allowed_table_size = 0  # the client sent SETTINGS_HEADER_TABLE_SIZE = 0
    encoder.header_table_size = 0
    assert decoder.decode(encoder.encode(RESPONSE), raw=True) == RESPONSE


def test_names_are_sent_lower_case_and_static_fields_by_index() -> None:
    encoder = StaticEncoder()
    encoder.encode([(b":status", b"200")])  # the first block carries the table size update
    assert encoder.encode([(b":status", b"200")]) == b"\x88"  # static index 8, one byte
    assert Decoder().decode(StaticEncoder().encode([(b"X-Trace", b"1")]), raw=True) == [(b"x-trace", b"1")]


def test_the_field_cache_stays_bounded_and_skips_request_ids() -> None:
    from proxy.h2.hpack_encoder import CACHE_ENTRIES

    encoder, decoder = StaticEncoder(), Decoder()
    for i in range(5 * CACHE_ENTRIES):
        headers = [*RESPONSE, (b"x-n", b"%d" % i), (b"x-request-id", b"r%d" % i), (b"x-big", b"b" * 500)]
        assert decoder.decode(encoder.encode(headers), raw=True) == headers
        assert len(encoder._cache) <= CACHE_ENTRIES
    assert not any(name in (b"x-request-id", b"x-big") for name, _ in encoder._cache)
