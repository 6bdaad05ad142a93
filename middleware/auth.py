"""``type: auth`` — API keys: who may call, with which models; identity for later middleware.

```yaml
middleware:
  - type: auth
    keys:
      - {id: search-prod, key: "${SEARCH_KEY}", tenant: search, models: [chat-default]}
      - {id: ops, key: "sha256:9f86d08…", limits: {requests_per_minute: 60}}
    keys_file: /etc/llm-sidecar/keys.yaml      # more keys, same fields, under `keys:`
```

The client sends its key as ``Authorization: Bearer <key>`` or ``api-key: <key>``. No key or an
unknown one: 401 ``invalid_api_key``; a model the key may not use: 403 ``model_not_allowed``. A key
limited to some models may only make requests that name one of them (``GET /v1/models`` lists just
those). The client's credential headers are removed before forwarding (an upstream with an
``api_key`` gets its own). The :class:`proxy.identity.Identity` lands in ``request.ctx``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

import orjson

from middleware.api_keys import ApiKeyConfig, KeyStore, duplicates, load_keys_file
from proxy.chain import Handler
from proxy.config import opt
from proxy.errors import InvalidApiKey, ModelNotAllowed, ModelNotFound
from proxy.forward import MODELS_PREFIX
from proxy.http import Headers, Request, Response
from proxy.identity import Identity, set_identity
from proxy.registry import BuildContext
from proxy.requested_model import requested_model

log = logging.getLogger("llm_sidecar.auth")

CREDENTIAL_HEADERS: Final = frozenset({b"authorization", b"api-key"})
_CHALLENGE: Final = ((b"www-authenticate", b'Bearer realm="llm-sidecar"'),)


@dataclass(frozen=True)
class AuthConfig:
    keys: tuple[ApiKeyConfig, ...] = opt((), "API keys: id, key (or sha256:<hex>), tenant, models, limits")
    keys_file: str | None = opt(
        None, "YAML or JSON file with a 'keys:' list of the same fields (relative to the working directory)"
    )
    # Read from keys_file when the config is loaded, so its problems stop the start like any other.
    file_keys: tuple[ApiKeyConfig, ...] = field(default=(), init=False, repr=False, compare=False)
    file_problems: tuple[str, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.keys_file:
            keys, problems = load_keys_file(self.keys_file)
            object.__setattr__(self, "file_keys", keys)
            object.__setattr__(self, "file_problems", tuple(problems))

    def validate(self) -> list[tuple[str, str]]:
        problems = [("keys_file", p) for p in self.file_problems]
        if not self.keys and not self.keys_file:
            problems.append(("keys", "give at least one key (here or in keys_file)"))
        entries = [(f"keys[{i}]", k) for i, k in enumerate(self.keys)]
        entries += [(f"{self.keys_file}: keys[{i}]", k) for i, k in enumerate(self.file_keys)]
        for where, message in duplicates(entries):
            if where.startswith("keys["):
                problems.append((where, message))
            else:  # in the keys file: name the file
                problems.append(("keys_file", f"{where}: {message}"))
        return problems

    def all_keys(self) -> tuple[ApiKeyConfig, ...]:
        return self.keys + self.file_keys


class Auth:
    Config = AuthConfig

    def __init__(self, config: AuthConfig, context: BuildContext) -> None:
        self.store = KeyStore(config.all_keys())
        routes = set(context.route_models)
        for entry in config.all_keys():
            unknown = sorted(set(entry.models) - routes - {"*"})
            if unknown:
                log.warning(
                    "auth: key %r names models that no route serves: %s", entry.id, ", ".join(unknown)
                )

    async def __call__(self, request: Request, next: Handler) -> Response:
        presented = credential(request.headers)
        if presented is None:
            raise InvalidApiKey(
                "You didn't provide an API key: send 'Authorization: Bearer <key>' or 'api-key: <key>'.",
                headers=_CHALLENGE,
            )
        identity = self.store.lookup(presented)
        if identity is None:
            raise InvalidApiKey("Incorrect API key provided.", headers=_CHALLENGE)
        request.headers[:] = [kv for kv in request.headers if kv[0] not in CREDENTIAL_HEADERS]
        set_identity(request, identity)
        if identity.models is None:
            return await next(request)
        path = request.path
        if path == "/v1/models":
            return _only_allowed(await next(request), identity)
        if path.startswith(MODELS_PREFIX):
            wanted = path[len(MODELS_PREFIX) :]
            if not identity.may_use(wanted):
                raise ModelNotFound(f"The model '{wanted}' does not exist", param="model")
            return await next(request)
        model = requested_model(request)
        if model is None:
            raise ModelNotAllowed(
                f"API key {identity.key_id!r} may only make requests that name one of its models",
                param="model",
            )
        if not identity.may_use(model):
            raise ModelNotAllowed(f"API key {identity.key_id!r} may not use model {model!r}", param="model")
        return await next(request)


def credential(headers: Headers) -> bytes | None:
    """The key from ``Authorization: Bearer …`` (preferred) or ``api-key: …``; None when neither."""
    api_key = None
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == b"api-key" and value.strip():
            api_key = value.strip()
    return api_key


def _only_allowed(response: Response, identity: Identity) -> Response:
    """``GET /v1/models`` for a key limited to some models: list only those."""
    if response.status != 200 or not isinstance(response.body, bytes):
        return response
    listing = orjson.loads(response.body)
    listing["data"] = [m for m in listing.get("data", ()) if identity.may_use(m.get("id", ""))]
    response.body = orjson.dumps(listing)
    return response
