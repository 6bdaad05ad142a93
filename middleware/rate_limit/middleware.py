"""``type: rate_limit`` — token buckets on requests and LLM tokens per minute, and in-flight caps.

```yaml
middleware:
  - type: auth
    keys_file: keys.yaml                  # keys may carry limits: {requests_per_minute, …}
  - type: rate_limit
    backend: redis                        # or memory (this process only)
    redis: {url: "redis://127.0.0.1:6379/0", timeout_ms: 50}
    on_redis_error: allow                 # or deny (503) while Redis is unreachable
    per: tenant                           # buckets per (tenant, model), or per (key, model)
    requests_per_minute: 600
    tokens_per_minute: 200000
    max_in_flight: 32                     # per API key
```

Before forwarding, a request takes one request and its estimated tokens (estimate.py) from the
buckets of its (tenant or key, model); when its response ends the tokens are settled with the real
usage (settle.py). Over a limit: 429 ``rate_limit_exceeded`` with ``Retry-After`` and
``retry-after-ms``; every answer carries the x-ratelimit-* headers (headers.py). Without ``auth``
in front, every request shares the bucket of scope ``anonymous``. What the sidecar answers itself
(``GET /v1/models``, ``/v1/models/{id}``: the forwarder's) is not limited at all: no slot, no
request or token from a bucket, no headers.
"""

from __future__ import annotations

from functools import partial
from typing import Final

from middleware.rate_limit.backend import Ask, Backend
from middleware.rate_limit.bucket import Decision, LimitSpec
from middleware.rate_limit.config import RateLimitConfig
from middleware.rate_limit.estimate import Estimate, ask_for_stream_usage, estimate
from middleware.rate_limit.headers import RATELIMIT_NAMES, duration, ratelimit_headers, retry_headers
from middleware.rate_limit.memory import MemoryBackend
from middleware.rate_limit.redis_backend import RedisBackend
from middleware.rate_limit.settle import settle_response
from proxy.chain import Handler
from proxy.errors import ProxyError, RateLimited
from proxy.forward import MODELS_PREFIX
from proxy.http import Request, Response
from proxy.identity import NO_LIMITS, KeyLimits, identity_of
from proxy.metrics import REDIS_FAILURES, REDIS_FAILURES_HELP
from proxy.registry import BuildContext
from proxy.requested_model import model_and_json

ANONYMOUS: Final = "anonymous"  # the scope and key id of requests that no auth identified
NO_MODEL: Final = "-"  # the bucket of requests that name no model, or one no route serves
NOTHING: Final = Estimate(0, 0)
MAX_KEYS_CACHED: Final = 65536  # key id → spec entries kept (then the cache starts over)
MODELS_LIST: Final = MODELS_PREFIX[:-1]  # "/v1/models": answered by the sidecar, like its children


class RateLimit:
    Config = RateLimitConfig

    def __init__(self, config: RateLimitConfig, context: BuildContext) -> None:
        self.cfg = config
        self.per_tenant = config.per == "tenant"
        self.routes = frozenset(context.route_models)  # other names share one bucket: no key per typo
        self.backend: Backend
        prev = context.previous
        if isinstance(prev, RateLimit):
            self.backend = prev.backend  # a reload with this config unchanged: the buckets go on
        elif config.backend == "redis":
            failures = context.metrics.counter(REDIS_FAILURES, REDIS_FAILURES_HELP, ["user"])
            self.backend = RedisBackend(config, context.clock, failures=failures)
        else:
            self.backend = MemoryBackend(context.clock, config.max_buckets)
        # Bucket specs by per-key limits: one per distinct `limits:` of the configured keys.
        self._specs: dict[KeyLimits, LimitSpec] = {NO_LIMITS: config.spec(NO_LIMITS)}
        # The same by key id, checked by identity: hashing a KeyLimits per request costs more.
        self._by_key: dict[str, tuple[KeyLimits, LimitSpec]] = {}
        self.refusals = context.metrics.counter(
            "rate_limit_refusals", "Requests refused 429 by rate_limit, by the limit they hit", ["reason"]
        )

    async def __call__(self, request: Request, next: Handler) -> Response:
        identity = identity_of(request)
        if identity is None:
            scope = key_id = ANONYMOUS
            limits = NO_LIMITS
        else:
            key_id = identity.key_id
            scope = identity.tenant if self.per_tenant else key_id
            limits = identity.limits
        known = self._by_key.get(key_id)
        spec = known[1] if known is not None and known[0] is limits else self._spec(key_id, limits)
        if spec.requests is None and spec.tokens is None and not spec.max_in_flight:
            return await next(request)
        path = request.path
        if path == MODELS_LIST or path.startswith(MODELS_PREFIX):
            return await next(request)  # the sidecar's own answer: no backend work to limit

        model, data = model_and_json(request)
        cost, strip = NOTHING, False
        if model is None or model not in self.routes:
            model = NO_MODEL
        elif data is not None and spec.tokens is not None:
            cost = estimate(data, request.path, self.cfg.chars_per_token, self.cfg.default_max_tokens)
            if data.get("stream") is True and self.cfg.stream_usage:
                strip = ask_for_stream_usage(request, data)

        reserved = cost.total
        ticket = await self.backend.acquire(Ask(scope, model, key_id, spec, reserved))
        decision = ticket.decision
        headers = ratelimit_headers(spec, decision) if decision is not None else []
        if decision is not None and not decision.allowed:
            self.refusals.inc((decision.reason,))
            raise RateLimited(
                _message(decision, spec, model, key_id, reserved),
                kind="tokens" if decision.reason in ("tokens", "too_large") else "requests",
                headers=headers + retry_headers(decision.retry_after_s),
            )
        try:
            response = await next(request)
        except BaseException as e:
            self.backend.release(ticket, 0)
            if isinstance(e, ProxyError):
                e.headers = e.headers + headers  # an error answer carries them too
            raise
        if headers:
            answer_headers = response.headers
            for name, _ in answer_headers:
                if name in RATELIMIT_NAMES:  # the upstream's own (OpenAI sends them): ours replace them
                    answer_headers[:] = [kv for kv in answer_headers if kv[0] not in RATELIMIT_NAMES]
                    break
            answer_headers.extend(headers)
        settle_response(
            response,
            reserved,
            cost.prompt,
            strip,
            self.cfg.max_usage_body_bytes,
            partial(self.backend.release, ticket),
        )
        return response

    def _spec(self, key_id: str, limits: KeyLimits) -> LimitSpec:
        spec = self._specs.get(limits)
        if spec is None:
            spec = self._specs[limits] = self.cfg.spec(limits)
        if len(self._by_key) >= MAX_KEYS_CACHED:
            self._by_key.clear()
        self._by_key[key_id] = (limits, spec)
        return spec

    def readiness(self) -> list[str]:
        """/readyz: the Redis backend's last round trip failed (the memory backend is always ready)."""
        problems = getattr(self.backend, "problems", None)
        return problems() if problems is not None else []

    async def aclose(self) -> None:
        await self.backend.aclose()


def _message(decision: Decision, spec: LimitSpec, model: str, key_id: str, cost: int) -> str:
    wait = duration(decision.retry_after_s) if decision.reason != "too_large" else ""
    if decision.reason == "requests" and spec.requests is not None:
        return (
            f"Rate limit reached for {model} on requests per min (RPM): Limit {spec.requests.per_minute}, "
            f"Remaining {decision.requests_remaining}. Please try again in {wait}."
        )
    if decision.reason == "tokens" and spec.tokens is not None:
        return (
            f"Rate limit reached for {model} on tokens per min (TPM): Limit {spec.tokens.per_minute}, "
            f"Requested {cost}, Remaining {decision.tokens_remaining}. Please try again in {wait}."
        )
    if decision.reason == "too_large" and spec.tokens is not None:
        return (
            f"Request too large for {model} on tokens per min (TPM): Limit {spec.tokens.per_minute}, "
            f"Requested {cost} (prompt estimate + max_tokens). Lower max_tokens or the prompt."
        )
    return (
        f"Too many requests in progress for API key {key_id!r}: limit {spec.max_in_flight}. "
        f"Please try again in {wait}."
    )
