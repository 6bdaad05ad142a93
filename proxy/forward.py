"""The end of the chain: answer what the sidecar owns (/v1/models), else route and forward.

The client's model name picks a route; the route's target says which upstream and which model
name that upstream knows. The upstream receives the rewritten body; ``request`` itself keeps what
the client sent, so a retry or failover can route again from scratch.
"""

from __future__ import annotations

import random
import time
from typing import Any

import orjson

from proxy.clock import Clock
from proxy.errors import InvalidRequest, MethodNotAllowed, ModelNotFound, NoHealthyTarget, NotFound
from proxy.http import Headers, Request, Response
from proxy.multipart import replace_model
from proxy.requested_model import read_model
from proxy.routing import Router, Target
from proxy.upstream.base import Upstream

MODELS_PREFIX = "/v1/models/"

# The OpenAI endpoints whose POST must name a model (their API reference: ``model`` required). A
# request to one without a model is the client's mistake, answered 400 as OpenAI does, not sent to
# the default upstream. Not here, as their model is optional at OpenAI and they go there:
# moderations and images (a default model), files, batches, uploads, vector stores.
MODEL_REQUIRED = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",  # unless it names a stored prompt, which carries its model
        "/v1/audio/speech",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
    }
)


class Forwarder:
    def __init__(
        self,
        router: Router,
        upstreams: dict[str, Upstream],
        fallback_upstream: str | None,
        rng: random.Random,
        clock: Clock,
    ) -> None:
        self.router = router
        self.clock = clock
        self.upstreams = upstreams
        self.fallback = upstreams[fallback_upstream] if fallback_upstream is not None else None
        self.rng = rng
        created = int(time.time())
        self._models = [
            {"id": m, "object": "model", "created": created, "owned_by": "llm-sidecar"} for m in router.models
        ]
        self._models_body = orjson.dumps({"object": "list", "data": self._models})

    async def __call__(self, request: Request) -> Response:
        path = request.path
        if not path.startswith("/v1/"):
            raise NotFound(f"unknown path {path!r}: the sidecar serves the OpenAI API under /v1/")
        if path == "/v1/models" or path.startswith(MODELS_PREFIX):
            return self._models_response(request)
        model, data, span = read_model(request)
        if model is None:
            if path in MODEL_REQUIRED and request.method == "POST" and not _names_a_prompt(path, data):
                raise InvalidRequest("Missing required parameter: 'model'.", param="model")
            upstream = self.fallback
            if upstream is None:
                raise InvalidRequest(
                    "this request names no model, and no default_upstream is configured", param="model"
                )
            upstream_body = request.body
        else:
            upstream, upstream_body = self._target(request, model, data, span)
        # Timed on ctx (inline: a helper coroutine costs a frame per request): from handing the
        # request to the pool to the response head, summed over attempts; the rest is the sidecar's.
        clock = self.clock
        ctx = request.ctx
        sent = clock.now()
        try:
            return await upstream.send(request, upstream_body)
        finally:
            ctx.upstream_at = now = clock.now()
            ctx.upstream_s += now - sent

    def _target(self, request: Request, model: str, data: Any, span: Any) -> tuple[Upstream, bytes]:
        """The upstream this attempt goes to, and the body it gets (the target's model name)."""
        ctx = request.ctx
        target = ctx.target
        if target is None or not isinstance(target, Target):
            target = self.router.pick(model, self.rng, ctx.tried)
            if target is None:  # every upstream of the route and its fallbacks failed its health check
                raise self._all_down(model)
            ctx.target = target
        if target.model == model:
            upstream_body = request.body
        elif span is not None:  # multipart: only the model field's bytes change
            upstream_body = replace_model(request.body, span, target.model)
        else:
            # Serializing the parsed body again costs less than splicing the client's bytes in
            # Python (measured: orjson ~3.8k instructions for a small chat body, a careful
            # byte-level splice ~17k; ~7k vs ~30k at 2 KB).
            assert data is not None  # a model read from JSON
            upstream_body = orjson.dumps({**data, "model": target.model})
        return self.upstreams[target.upstream], upstream_body

    def _all_down(self, model: str) -> NoHealthyTarget:
        why = "; ".join(f"upstream {u}: {reason}" for u, reason in self.router.unavailable(model).items())
        return NoHealthyTarget(
            f"no upstream can serve model '{model}' now: each failed its health check ({why})",
            headers=[(b"retry-after", b"1")],
        )

    def _models_response(self, request: Request) -> Response:
        if request.method != "GET":
            raise MethodNotAllowed(f"{request.method} is not allowed on {request.path}")
        if request.path == "/v1/models":
            return Response(200, Headers([(b"content-type", b"application/json")]), self._models_body)
        wanted = request.path[len(MODELS_PREFIX) :]
        for m in self._models:
            if m["id"] == wanted:
                return Response.json(200, m)
        raise ModelNotFound(f"The model '{wanted}' does not exist", param="model")


def _names_a_prompt(path: str, data: dict[str, Any] | None) -> bool:
    """A Responses call from a stored prompt (``prompt: {id}``): the prompt names the model."""
    return path == "/v1/responses" and data is not None and data.get("prompt") is not None
