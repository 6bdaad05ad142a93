"""The model a request names, read the way the forwarder routes it (JSON or multipart body).

Middleware that decide by model (auth's allowed models, rate-limit buckets) use this, so that what
they check is what gets routed: a mislabelled JSON body is still read as JSON. The JSON body is
parsed once and cached on the request (``Request.json``); the forwarder reuses it.
"""

from __future__ import annotations

from typing import Any

from proxy.errors import InvalidRequest
from proxy.http import Request
from proxy.multipart import boundary_of, find_model


def requested_model(request: Request) -> str | None:
    """The client's ``model``, or None when the request names none (files, batches, GETs).

    Raises InvalidRequest (400) for a body the forwarder would reject as well.
    """
    return model_and_json(request)[0]


def model_and_json(request: Request) -> tuple[str | None, dict[str, Any] | None]:
    """The client's ``model`` and, for a JSON body, the body parsed (a multipart one: None)."""
    body = request.body
    if not body or request.method in _NO_BODY:
        return None, None
    content_type = request.headers.get(b"content-type")
    if content_type is None or content_type.startswith(b"application/json"):
        data = request.json()  # the usual case, labelled JSON: no multipart check needed
        if not isinstance(data, dict):
            raise InvalidRequest("request body must be a JSON object")
        value = data.get("model")
        if value is not None and not isinstance(value, str):
            raise InvalidRequest("'model' must be a string", param="model")
        return value, data
    boundary = boundary_of(content_type)
    if boundary is not None:
        span = find_model(body, boundary)
        return None if span is None else body[span[0] : span[1]].decode("utf-8", "replace"), None
    data = _json_object(request, body, content_type)
    if data is None:
        return None, None
    value = data.get("model")
    if value is not None and not isinstance(value, str):
        raise InvalidRequest("'model' must be a string", param="model")
    return value, data


def json_body(request: Request) -> dict[str, Any] | None:
    """The body as a JSON object when the forwarder would read it as JSON, else None.

    Raises InvalidRequest (400) for JSON that is not an object or does not parse.
    """
    body = request.body
    if not body or request.method in _NO_BODY:
        return None
    content_type = request.headers.get(b"content-type")
    if content_type is not None and boundary_of(content_type) is not None:
        return None
    return _json_object(request, body, content_type)


_NO_BODY = frozenset({"GET", "HEAD", "DELETE"})


def _json_object(request: Request, body: bytes, content_type: bytes | None) -> dict[str, Any] | None:
    """The body parsed (once: ``Request.json``) when it is labelled JSON or looks like it."""
    labelled = (
        content_type is None or content_type.startswith(b"application/json") or b"+json" in content_type
    )
    if not labelled and body.lstrip()[:1] != b"{":
        return None
    data = request.json()
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data
