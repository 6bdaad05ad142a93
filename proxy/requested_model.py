"""The model a request names, read one way for everyone (JSON or multipart body).

The forwarder routes by it and middleware decide by it (auth's allowed models, rate-limit buckets,
circuit breakers), so what they check is what gets routed: a mislabelled JSON body is still read as
JSON. The JSON body is parsed once and cached on the request (``Request.json``), and the whole
reading too (``Request.model_read``): the forwarder and each middleware that asks pay for it once.
"""

from __future__ import annotations

from typing import Any

from proxy.errors import InvalidRequest
from proxy.http import Request
from proxy.multipart import boundary_of, find_model

_NO_BODY = frozenset({"GET", "HEAD", "DELETE"})

# (model, the JSON body parsed, the model's (start, end) in a multipart body)
ModelRead = tuple[str | None, dict[str, Any] | None, tuple[int, int] | None]


def read_model(request: Request) -> ModelRead:
    """The client's ``model`` (None when the request names none: files, batches, GETs), with the
    JSON body it came from, or its place in a multipart body (for the forwarder's rewrite).

    Raises InvalidRequest (400) for a JSON body that does not parse, is not an object, or whose
    ``model`` is not a string.
    """
    body = request.body
    cached = request.model_read
    if cached is not None and cached[0] is body:
        read: ModelRead = cached[1]
        return read
    read = _read_model(request, body)
    request.model_read = (body, read)
    return read


def _read_model(request: Request, body: bytes) -> ModelRead:
    if not body or request.method in _NO_BODY:
        return None, None, None
    content_type = request.headers.get(b"content-type")
    if content_type is not None and not content_type.startswith(b"application/json"):
        boundary = boundary_of(content_type)
        if boundary is not None:
            span = find_model(body, boundary)
            if span is None:
                return None, None, None
            return body[span[0] : span[1]].decode("utf-8", "replace"), None, span
        # Parse whatever looks like JSON whatever its content-type says, so that a mislabelled
        # body cannot slip past routing (and the model checks of auth) to the default upstream.
        if b"+json" not in content_type and body.lstrip()[:1] != b"{":
            return None, None, None
    data = request.json()
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    value = data.get("model")
    if value is not None and not isinstance(value, str):
        raise InvalidRequest("'model' must be a string", param="model")
    return value, data, None


def requested_model(request: Request) -> str | None:
    """The client's ``model``, or None when the request names none (see :func:`read_model`)."""
    return read_model(request)[0]


def model_and_json(request: Request) -> tuple[str | None, dict[str, Any] | None]:
    """The client's ``model`` and, for a JSON body, the body parsed (a multipart one: None)."""
    model, data, _ = read_model(request)
    return model, data
