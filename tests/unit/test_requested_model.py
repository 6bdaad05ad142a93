"""proxy.requested_model: one reading of the client's model, cached on the request until its body
is replaced."""

from __future__ import annotations

import orjson
import pytest

from proxy.errors import InvalidRequest
from proxy.http import Headers, Request, RequestContext
from proxy.requested_model import read_model


def chat(body: bytes, content_type: bytes = b"application/json") -> Request:
    headers = Headers([(b"content-type", content_type)])
    return Request("POST", b"/v1/chat/completions", headers, body, RequestContext(b"id", "peer", 0.0))


def test_the_reading_is_cached_while_the_body_stays() -> None:
    request = chat(orjson.dumps({"model": "a", "messages": []}))
    first = read_model(request)
    assert first[0] == "a" and first[1] == {"model": "a", "messages": []}
    assert read_model(request) is first  # no second parse


def test_a_replaced_body_is_read_again() -> None:
    request = chat(orjson.dumps({"model": "a"}))
    assert read_model(request)[0] == "a"
    request.set_json({"model": "b"})
    assert read_model(request)[0] == "b"


def test_a_mislabelled_json_body_is_still_read_and_a_bad_one_refused() -> None:
    assert read_model(chat(b'{"model": "a"}', b"text/plain"))[0] == "a"
    with pytest.raises(InvalidRequest):
        read_model(chat(b'{"model": 5}'))
