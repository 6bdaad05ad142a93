"""``type: headers`` — add, replace or remove request and response headers.

It is also the example of how to write a middleware (README: "Writing a middleware"):

1. A frozen dataclass for its options, fields declared with ``opt``/``req`` (type, default, help).
   The loader validates the YAML entry against it and reports bad keys with file and line.
2. A class with ``Config = <that dataclass>``, built once as ``Class(config, build_context)``;
   do the work that can be done once (here: encoding header names) in ``__init__``.
3. ``async def __call__(self, request, next) -> Response``: change the request, call
   ``await next(request)``, change the response. Per-request state goes in ``request.ctx``.

```yaml
middleware:
  - type: headers
    request_set: {x-team: search}
    request_remove: [x-debug]
    response_set: {x-served-by: llm-sidecar}
    response_remove: [server]
```
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.chain import Handler
from proxy.config import opt
from proxy.http import Request, Response
from proxy.registry import BuildContext


@dataclass(frozen=True)
class HeadersConfig:
    request_set: dict[str, str] = opt({}, "headers set on the request sent upstream (replacing)")
    request_remove: tuple[str, ...] = opt((), "headers removed from the request sent upstream")
    response_set: dict[str, str] = opt({}, "headers set on the response to the client (replacing)")
    response_remove: tuple[str, ...] = opt((), "headers removed from the response to the client")

    def validate(self) -> list[tuple[str, str]]:
        problems = []
        for key in ("request_set", "response_set"):
            for name in getattr(self, key):
                if not _is_token(name):
                    problems.append((f"{key}.{name}", "is not a valid header name"))
        for key in ("request_remove", "response_remove"):
            for i, name in enumerate(getattr(self, key)):
                if not _is_token(name):
                    problems.append((f"{key}[{i}]", f"{name!r} is not a valid header name"))
        return problems


class HeadersMiddleware:
    Config = HeadersConfig

    def __init__(self, config: HeadersConfig, ctx: BuildContext) -> None:
        self._req_set = [(k.lower().encode(), v.encode()) for k, v in config.request_set.items()]
        self._req_drop = frozenset(k.lower().encode() for k in config.request_remove) | {
            k for k, _ in self._req_set
        }
        self._resp_set = [(k.lower().encode(), v.encode()) for k, v in config.response_set.items()]
        self._resp_drop = frozenset(k.lower().encode() for k in config.response_remove) | {
            k for k, _ in self._resp_set
        }

    async def __call__(self, request: Request, next: Handler) -> Response:
        if self._req_drop:
            request.headers[:] = [kv for kv in request.headers if kv[0] not in self._req_drop]
            request.headers.extend(self._req_set)
        response = await next(request)
        if self._resp_drop:
            response.headers[:] = [kv for kv in response.headers if kv[0] not in self._resp_drop]
            response.headers.extend(self._resp_set)
        return response


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _is_token(name: str) -> bool:
    return bool(name) and all(c in _TOKEN_CHARS for c in name)
