"""The request header checks of the HTTP/2 front (proxy/server/h2_request.py), RFC 9113 §8.2–8.3."""

from __future__ import annotations

import pytest

from proxy.server.h2_request import MalformedHeaders, check_trailers, split_request

BASE = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/v1/chat/completions"),
    (b":authority", b"x"),
]


def test_a_request_splits_into_method_path_and_headers_with_host() -> None:
    fields = [*BASE, (b"content-type", b"application/json"), (b"te", b"trailers"), (b"x-empty", b"")]
    method, path, headers = split_request(fields)
    assert (method, path) == (b"POST", b"/v1/chat/completions")
    assert headers == [(b"content-type", b"application/json"), (b"te", b"trailers"), (b"x-empty", b""),
                       (b"host", b"x")]  # fmt: skip


def test_cookies_are_joined_and_a_matching_host_is_kept_once() -> None:
    fields = [*BASE, (b"cookie", b"a=1"), (b"host", b"x"), (b"cookie", b"b=2"), (b"cookie", b"c=3")]
    _, _, headers = split_request(fields)
    assert headers == [(b"host", b"x"), (b"cookie", b"a=1; b=2; c=3")]


def test_connect_has_no_scheme_or_path() -> None:
    assert split_request([(b":method", b"CONNECT"), (b":authority", b"h:443")])[:2] == (b"CONNECT", b"")
    with pytest.raises(MalformedHeaders):
        split_request([(b":method", b"CONNECT"), (b":authority", b"h:443"), (b":path", b"/")])


@pytest.mark.parametrize(
    "fields",
    [
        [*BASE, (b"X-Upper", b"1")],
        [*BASE, (b"x-bad name", b"1")],
        [*BASE, (b"x-colon:", b"1")],
        [*BASE, (b"x-\x7f", b"1")],
        [*BASE, (b"x-\xc3\xa9", b"1")],
        [*BASE, (b"", b"1")],
        [*BASE, (b"x-a", b"a\r\nb")],
        [*BASE, (b"x-a", b"a\0b")],
        [*BASE, (b"x-a", b" a")],
        [*BASE, (b"x-a", b"a\t")],
        [*BASE[:3], (b":authority", b"x\n")],
        *(
            [*BASE, (name, b"x")]
            for name in (b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade")
        ),
        [*BASE, (b"te", b"gzip")],
        [*BASE, (b":method", b"GET")],
        [*BASE, (b":path", b"/b")],
        [*BASE, (b":scheme", b"https")],
        [*BASE, (b":authority", b"y")],
        [*BASE, (b":status", b"200")],
        [*BASE, (b":protocol", b"websocket")],
        [*BASE, (b":unknown", b"1")],
        [
            (b":method", b"GET"),
            (b"x-a", b"1"),
            (b":path", b"/"),
            (b":scheme", b"http"),
            (b":authority", b"x"),
        ],
        BASE[1:],
        [BASE[0], BASE[2], BASE[3]],
        [BASE[0], BASE[1], BASE[3]],
        [BASE[0], BASE[1], (b":path", b""), BASE[3]],
        BASE[:3],
        [*BASE[:3], (b"host", b"a"), (b"host", b"a")],
        [*BASE, (b"host", b"y")],
    ],
    ids=lambda fields: repr(fields[-1]),
)
def test_malformed_blocks_are_refused(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(MalformedHeaders):
        split_request(fields)


def test_a_host_alone_will_do() -> None:
    assert split_request([*BASE[:3], (b"host", b"h")])[2] == [(b"host", b"h")]


@pytest.mark.parametrize(
    "fields", [[(b":status", b"200")], [(b"X-A", b"1")], [(b"x-a", b"1\n")], [(b"connection", b"close")]]
)
def test_malformed_trailers_are_refused(fields: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(MalformedHeaders):
        check_trailers(fields)


def test_plain_trailers_pass() -> None:
    check_trailers([(b"x-checksum", b"abc"), (b"x-empty", b"")])
