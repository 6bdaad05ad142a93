"""Who is calling: the typed identity the ``auth`` middleware puts on a request for later middleware.

``request.ctx.identity`` (the key id) and ``request.ctx.tenant`` are plain strings for logs and
simple uses; the whole :class:`Identity` — allowed models, per-key limits, metadata — is in
``request.ctx.extra[IDENTITY]``, read with :func:`identity_of`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from proxy.config import opt
from proxy.http import Request

IDENTITY: Final = "identity"  # the request.ctx.extra key holding the Identity


@dataclass(frozen=True)
class KeyLimits:
    """Per-key overrides of the ``rate_limit`` middleware's defaults (unset: use the default)."""

    requests_per_minute: int | None = opt(None, "requests per minute for this key", min=1)
    tokens_per_minute: int | None = opt(None, "LLM tokens (prompt + completion) per minute", min=1)
    max_in_flight: int | None = opt(None, "requests of this key in progress at once", min=1)


NO_LIMITS: Final = KeyLimits()


@dataclass(frozen=True)
class Identity:
    key_id: str
    tenant: str
    models: frozenset[str] | None  # the route names this key may use; None: every model
    limits: KeyLimits = NO_LIMITS
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


def identity_of(request: Request) -> Identity | None:
    """The caller's identity, or None when no ``auth`` middleware ran before."""
    identity = request.ctx.extra.get(IDENTITY)
    return identity if isinstance(identity, Identity) else None


def set_identity(request: Request, identity: Identity) -> None:
    ctx = request.ctx
    ctx.identity = identity.key_id
    ctx.tenant = identity.tenant
    ctx.extra[IDENTITY] = identity
