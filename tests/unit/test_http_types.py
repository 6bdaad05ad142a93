"""proxy.http's Response: it owns its headers."""

from __future__ import annotations

from proxy.http import Headers, Response


def test_a_response_keeps_its_own_copy_of_the_headers_it_is_given() -> None:
    shared = Headers([(b"x-a", b"1")])
    first = Response(200, shared, b"")
    second = Response(200, shared, b"")
    first.headers.append((b"x-b", b"2"))
    assert shared == [(b"x-a", b"1")]
    assert second.headers == [(b"x-a", b"1")]


def test_response_json_leaves_the_callers_headers_alone() -> None:
    given = ((b"x-a", b"1"),)
    response = Response.json(200, {"ok": True}, given)
    assert response.headers == [(b"x-a", b"1"), (b"content-type", b"application/json")]
    assert given == ((b"x-a", b"1"),)
