"""Find and replace the ``model`` field of a multipart/form-data body (audio, image edits).

Only the value bytes of the one part are replaced; every other byte passes through untouched.
"""

from __future__ import annotations

import re

_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?', re.IGNORECASE)
_MODEL_PART = re.compile(rb'content-disposition:[^\r\n]*\bname="model"[^\r\n]*\r\n', re.IGNORECASE)


def boundary_of(content_type: bytes) -> bytes | None:
    if not content_type.lower().startswith(b"multipart/form-data"):
        return None
    m = _BOUNDARY.search(content_type)
    return m.group(1) if m else None


def find_model(body: bytes, boundary: bytes) -> tuple[int, int] | None:
    """(start, end) of the model field's value in ``body``, or None when there is none."""
    delimiter = b"--" + boundary
    pos = 0
    while True:
        start = body.find(delimiter, pos)
        if start < 0:
            return None
        head_start = start + len(delimiter) + 2  # past "\r\n"
        head_end = body.find(b"\r\n\r\n", head_start)
        if head_end < 0:
            return None
        if _MODEL_PART.search(body, head_start, head_end + 2):
            value_start = head_end + 4
            value_end = body.find(b"\r\n" + delimiter, value_start)
            return (value_start, value_end) if value_end >= 0 else None
        pos = head_end


def replace_model(body: bytes, span: tuple[int, int], model: str) -> bytes:
    return body[: span[0]] + model.encode() + body[span[1] :]
