"""The request header block of an HTTP/2 stream: checked (RFC 9113 §8.2, §8.3) and split in one pass.

The front runs h2 with ``validate_inbound_headers`` and ``normalize_inbound_headers`` off: h2 checks
each header in seven chained generators, which was the largest cost of a small request after HPACK.
:func:`split_request` makes the same checks in the loop that picks out the pseudo-header fields
anyway, and a malformed block raises :class:`MalformedHeaders`, which the connection answers as h2
did, with GOAWAY PROTOCOL_ERROR (RFC 9113 §5.4.1 lets a stream error be treated as a connection
error). What is checked:

- field names: not empty, none of 0x00–0x20, upper case A–Z, 0x7f–0xff, and no ':' after the first
  byte; values: no NUL, CR or LF, no space or tab at either end (§8.2.1);
- no connection-specific fields (``connection``, ``keep-alive``, ``proxy-connection``,
  ``transfer-encoding``, ``upgrade``), and ``te`` only as ``trailers`` (§8.2.2);
- pseudo-header fields only ``:method``, ``:scheme``, ``:authority``, ``:path``, each at most once
  and before every regular field; ``:method`` always; ``:scheme`` and a non-empty ``:path`` unless
  the method is CONNECT, which has neither (§8.3.1);
- ``:authority`` or ``host``, one ``host`` at most, the two equal when both are there (as h2).

Several ``cookie`` fields are joined with ``"; "`` (§8.2.3), as they must be before an HTTP/1.1 hop.
Trailers (:func:`check_trailers`) get the field checks and must carry no pseudo-header field.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from h2.utilities import CONNECTION_HEADERS

from proxy.http import Headers

# Bytes a field name may hold: what is left after deleting these must be empty.
_NAME_OK = bytes(c for c in range(0x21, 0x7F) if not (0x41 <= c <= 0x5A) and c != 0x3A)
_VALUE_BAD = (b"\x00", b"\r", b"\n")
_VALUE_OK = bytes(c for c in range(256) if c not in (0x00, 0x0A, 0x0D))
_EDGE_SPACE = (0x20, 0x09)
_CONNECTION_SPECIFIC = CONNECTION_HEADERS  # h2's own list (RFC 9113 §8.2.2)


class MalformedHeaders(Exception):
    """A header block RFC 9113 calls malformed; the message says why."""


def _bad_value(value: bytes) -> bool:
    if not value:
        return False
    return (
        value[0] in _EDGE_SPACE
        or value[-1] in _EDGE_SPACE
        or _VALUE_BAD[0] in value
        or _VALUE_BAD[1] in value
        or _VALUE_BAD[2] in value
    )


def _check_regular(name: bytes, value: bytes) -> None:
    if not name or name.translate(None, _NAME_OK):
        raise MalformedHeaders(f"invalid header name {name!r}")
    if name in _CONNECTION_SPECIFIC:
        raise MalformedHeaders(f"connection-specific header field {name.decode('latin-1')}")
    if name == b"te" and value.lower() != b"trailers":
        raise MalformedHeaders(f"te: {value!r} (only 'trailers' is allowed)")


_REQUEST_PSEUDO = frozenset({b":method", b":path", b":scheme", b":authority"})


def split_request(fields: Sequence[tuple[bytes, bytes]]) -> tuple[bytes, bytes, Headers]:
    """``(method, path, headers)`` of a request header block; ``:authority`` becomes ``host``."""
    pseudo: dict[bytes, bytes] = {}
    host: bytes | None = None
    cookies: list[bytes] | None = None
    headers = Headers()
    regular = False
    edge = _EDGE_SPACE
    for name, value in fields:
        if not name:
            raise MalformedHeaders("an empty header name")
        if value and (value[0] in edge or value[-1] in edge):
            raise MalformedHeaders(f"the value of {name!r} starts or ends with white space")
        if name[0] == 0x3A:  # ':'
            if regular:
                raise MalformedHeaders(f"pseudo-header field {name!r} after a regular field")
            if name not in _REQUEST_PSEUDO:
                raise MalformedHeaders(f"pseudo-header field {name!r} is not allowed in a request")
            if name in pseudo:
                raise MalformedHeaders(f"duplicate {name.decode()}")
            pseudo[name] = value
            continue
        regular = True
        if name in _CONNECTION_SPECIFIC:
            raise MalformedHeaders(f"connection-specific header field {name.decode('latin-1')}")
        if name == b"host":
            if host is not None:
                raise MalformedHeaders("more than one host header")
            host = value
        elif name == b"cookie":
            if cookies is None:
                cookies = [value]
            else:
                cookies.append(value)
                continue
        elif name == b"te" and value.lower() != b"trailers":
            raise MalformedHeaders(f"te: {value!r} (only 'trailers' is allowed)")
        headers.append((name, value))
    # The byte checks of every name and value at once: deleting the allowed bytes leaves none.
    if b"".join([name for name, _ in headers]).translate(None, _NAME_OK):
        bad = next(name for name, _ in headers if name.translate(None, _NAME_OK))
        raise MalformedHeaders(f"invalid header name {bad!r}")
    if b"".join([value for _, value in fields]).translate(None, _VALUE_OK):
        raise MalformedHeaders("a header value holds NUL, CR or LF")
    method, path = pseudo.get(b":method"), pseudo.get(b":path")
    scheme, authority = pseudo.get(b":scheme"), pseudo.get(b":authority")
    if method is None:
        raise MalformedHeaders("no :method")
    if method == b"CONNECT":
        if scheme is not None or path is not None:
            raise MalformedHeaders("CONNECT with :scheme or :path")
        path = b""
    elif scheme is None or not path:
        raise MalformedHeaders("no :scheme" if scheme is None else "no :path, or an empty one")
    if authority is not None:
        if host is None:
            headers.append((b"host", authority))
        elif host != authority:
            raise MalformedHeaders("host and :authority differ")
    elif host is None:
        raise MalformedHeaders("neither :authority nor host")
    if cookies is not None and len(cookies) > 1:
        headers.set(b"cookie", b"; ".join(cookies))
    assert path is not None
    return method, path, headers


def check_trailers(fields: Iterable[tuple[bytes, bytes]]) -> None:
    """Trailers are dropped, but a malformed block is still a protocol error."""
    for name, value in fields:
        if name[:1] == b":":
            raise MalformedHeaders(f"pseudo-header field {name!r} in trailers")
        if _bad_value(value):
            raise MalformedHeaders(f"invalid value of header {name!r}")
        _check_regular(name, value)
