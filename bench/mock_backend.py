"""OpenAI-compatible mock backend for the integration tests and the benchmarks.

Run ``python -m bench.mock_backend --port 8001 [--host 127.0.0.1] [--h2c]`` (port 0 picks a free port;
``--h2c`` also serves HTTP/2 with prior knowledge on that port, see bench/mock_h2c.py). It
prints one line, ``mock backend listening on http://HOST:PORT``, and serves until SIGINT/SIGTERM.

Endpoints: POST /v1/chat/completions and /v1/completions (``stream`` or not), POST /v1/embeddings,
GET /v1/models. Any other path and method answers an echo of the request (``"object": "mock.echo"``).
Control, not counted in the stats: GET /_mock/stats, POST /_mock/reset, POST|DELETE /_mock/faults,
POST /_mock/health ``{"status": 503}`` (what GET /health answers from then on; 200 at start and after
a reset). GET /health (a health check's path) is not counted in ``requests`` either, only in
``health_checks``.

Per-request knobs, as request headers:
  x-mock-chunks: N         content chunks of a stream / tokens of a completion (else max_tokens, else 8)
  x-mock-delay-ms: F       gap between stream events
  x-mock-first-byte-ms: F  sleep before the response head
  x-mock-status: S         answer S with an OpenAI error body
  x-mock-retry-after: SEC  add ``Retry-After`` and ``retry-after-ms`` to a status answer
  x-mock-stall-after: N    send N stream events (non-stream: N body bytes), then stall, never closing
  x-mock-reset-after: N    send N stream events (non-stream: N body bytes), then abort the connection
  x-mock-content-bytes: N  non-stream: content of N bytes; stream: N bytes of content per chunk
Global faults for POST requests (clients that cannot set headers): see :class:`Faults` (a status
burst, a seeded share of status answers, a seeded share of resets, a first-byte delay).

Stats (GET /_mock/stats) count requests by outcome (``completed``, ``disconnects``, ``resets``) and
answers by request id: ``answered`` is the number of 2xx answers that completed (a non-stream body
handed to the transport, or a stream that ended normally), and ``answered_twice`` the number of
``x-request-id`` values (the sidecar forwards one) answered with a 2xx more than once, over the last
:data:`ANSWER_IDS` ids seen. Both transports (HTTP/1.1 and h2c) count them.

A client disconnect cancels the handler (the runner uses ``handler_cancellation=True``) and is counted
in the stats with its ``time.monotonic()``; in-process users of :func:`create_app` need the same.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import itertools
import math
import random
import signal
import struct
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

import orjson
import uvloop
from aiohttp import web

MODELS = ("mock-model-v1", "mock-model-v2")
DEFAULT_TOKENS, MAX_TOKENS, DEFAULT_DIMENSIONS = 8, 4096, 8
ANSWER_IDS = 100_000  # request ids remembered for ``answered_twice``
ABORT_GRACE_S = 1.0  # only waited out when the runner does not cancel handlers on disconnect

_WORDS = ("Hello", ",", " this", " is", " the", " mock", " backend", ".")
_WORDS_JSON = tuple(orjson.dumps(w) for w in _WORDS)
_FILLER = "lorem ipsum dolor sit amet "
_JSON = "application/json"
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_SSE_DONE = b"data: [DONE]\n\n"
# Stream chunk pieces (first content, content, close, final) for chat (True) and text completions.
_PIECES = {
    True: (b'"delta":{"role":"assistant","content":', b'"delta":{"content":', b"}", b'"delta":{}'),
    False: (b'"text":', b'"text":', b"", b'"text":""'),
}
_OPEN_TAIL = b',"logprobs":null,"finish_reason":null}]}\n\n'
_STOP_TAIL = b',"logprobs":null,"finish_reason":"stop"}]}\n\n'
_MODEL_LIST = [{"id": m, "object": "model", "created": 1_700_000_000, "owned_by": "mock"} for m in MODELS]
_MODELS_BODY = orjson.dumps({"object": "list", "data": _MODEL_LIST})
_ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", None),
    404: ("not_found_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


class BadKnob(ValueError):
    """A knob header or fault setting with a value the mock cannot use."""


def _number(raw: str | float | None, name: str) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise BadKnob(f"{name}: expected a number, got {raw!r}") from None
    if not math.isfinite(value) or value < 0:
        raise BadKnob(f"{name}: expected a finite number >= 0, got {raw!r}")
    return value


def _integer(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name)
    if raw is not None and not raw.strip().isdigit():
        raise BadKnob(f"{name}: expected an integer >= 0, got {raw!r}")
    return None if raw is None else int(raw)


def _seconds(headers: Mapping[str, str], name: str) -> float:
    return (_number(headers.get(name), name) or 0.0) / 1000


@dataclass(frozen=True, slots=True)
class Knobs:
    """The ``x-mock-*`` headers of one request, parsed."""

    chunks: int | None
    delay_s: float
    first_byte_s: float
    status: int | None
    retry_after: float | None
    stall_after: int | None
    reset_after: int | None
    content_bytes: int | None

    @classmethod
    def parse(cls, h: Mapping[str, str]) -> Knobs:
        return cls(
            chunks=_integer(h, "x-mock-chunks"),
            delay_s=_seconds(h, "x-mock-delay-ms"),
            first_byte_s=_seconds(h, "x-mock-first-byte-ms"),
            status=_integer(h, "x-mock-status"),
            retry_after=_number(h.get("x-mock-retry-after"), "x-mock-retry-after"),
            stall_after=_integer(h, "x-mock-stall-after"),
            reset_after=_integer(h, "x-mock-reset-after"),
            content_bytes=_integer(h, "x-mock-content-bytes"),
        )

    def fault_point(self) -> int | None:
        """Events (stream) or bytes (non-stream) to send before a stall or reset, if any."""
        points = [p for p in (self.stall_after, self.reset_after) if p is not None]
        return min(points) if points else None


@dataclass
class Faults:
    """Global faults set with ``POST /_mock/faults``; they apply to POST requests only.

    JSON: ``{"status_burst": {"status": 503, "count": 5, "retry_after": 1.5}, "status_ratio": {"status":
    503, "ratio": 0.05, "retry_after": null}, "first_byte_ms": 0, "reset_ratio": 0.0, "seed": 1}``
    (every key optional): a seeded ``reset_ratio`` of the requests is aborted before any response
    byte; the next ``count`` requests get the burst's ``status``; of the others, a seeded
    ``status_ratio.ratio`` gets ``status_ratio.status`` (OpenAI error body, ``Retry-After`` and
    ``retry-after-ms`` when ``retry_after`` is set); every request waits ``first_byte_ms``. An
    ``x-mock-status`` header wins over both statuses. ``seed`` drives every random fault.
    """

    burst_status: int = 503
    burst_count: int = 0
    burst_retry_after: float | None = None
    first_byte_ms: float = 0.0
    reset_ratio: float = 0.0
    ratio_status: int = 503
    status_ratio: float = 0.0
    ratio_retry_after: float | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(1))

    @classmethod
    def from_json(cls, data: object) -> Faults:
        if not isinstance(data, dict):
            raise BadKnob("faults: expected a JSON object")
        unknown = set(data) - {"status_burst", "status_ratio", "first_byte_ms", "reset_ratio", "seed"}
        if unknown:
            raise BadKnob(f"faults: unknown keys {sorted(unknown)}")
        burst = data.get("status_burst") or {}
        if not isinstance(burst, dict) or set(burst) - {"status", "count", "retry_after"}:
            raise BadKnob("faults.status_burst: expected {status, count, retry_after}")
        share = data.get("status_ratio") or {}
        if not isinstance(share, dict) or set(share) - {"status", "ratio", "retry_after"}:
            raise BadKnob("faults.status_ratio: expected {status, ratio, retry_after}")
        faults = cls(
            burst_status=int(_number(burst.get("status", 503), "status_burst.status") or 0),
            burst_count=int(_number(burst.get("count", 0), "status_burst.count") or 0),
            burst_retry_after=_number(burst.get("retry_after"), "status_burst.retry_after"),
            first_byte_ms=_number(data.get("first_byte_ms", 0), "first_byte_ms") or 0.0,
            reset_ratio=_number(data.get("reset_ratio", 0), "reset_ratio") or 0.0,
            ratio_status=int(_number(share.get("status", 503), "status_ratio.status") or 0),
            status_ratio=_number(share.get("ratio", 0), "status_ratio.ratio") or 0.0,
            ratio_retry_after=_number(share.get("retry_after"), "status_ratio.retry_after"),
            rng=random.Random(data.get("seed", 1)),
        )
        if not (100 <= faults.burst_status <= 599 and 100 <= faults.ratio_status <= 599):
            raise BadKnob("faults: status_burst.status and status_ratio.status must be 100..599")
        if faults.reset_ratio > 1 or faults.status_ratio > 1:
            raise BadKnob("faults: reset_ratio and status_ratio.ratio must be 0..1")
        return faults

    def take_status(self) -> tuple[int, float | None] | None:
        if self.burst_count <= 0:
            return None
        self.burst_count -= 1
        return self.burst_status, self.burst_retry_after

    def roll_reset(self) -> bool:
        return self.reset_ratio > 0 and self.rng.random() < self.reset_ratio

    def roll_status(self) -> tuple[int, float | None] | None:
        if self.status_ratio > 0 and self.rng.random() < self.status_ratio:
            return self.ratio_status, self.ratio_retry_after
        return None

    def plan(self, knobs: Knobs) -> FaultPlan:
        """What the global faults do to one POST request with ``knobs`` (both transports use this)."""
        if self.roll_reset():
            return FaultPlan(True, knobs.first_byte_s, None, None)
        first_byte_s = max(knobs.first_byte_s, self.first_byte_ms / 1000)
        status, retry_after = knobs.status, knobs.retry_after
        injected = self.take_status() or self.roll_status()
        if injected is not None and status is None:
            status, retry_after = injected[0], injected[1] if retry_after is None else retry_after
        return FaultPlan(False, first_byte_s, status, retry_after)


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """The fate of one request: abort it, or wait ``first_byte_s`` and answer ``status`` (if set)."""

    reset: bool
    first_byte_s: float
    status: int | None
    retry_after: float | None

    @classmethod
    def of(cls, method: str, knobs: Knobs, faults: Faults) -> FaultPlan:
        """The plan of a request: global faults apply to POST requests only."""
        if method == "POST":
            return faults.plan(knobs)
        return cls(False, knobs.first_byte_s, knobs.status, knobs.retry_after)


@dataclass
class Stats:
    requests: int = 0
    by_path: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    completed: int = 0
    disconnects: int = 0
    resets: int = 0  # connections the mock aborted itself (reset knobs and reset_ratio)
    h2_connections: int = 0  # HTTP/2 (h2c) connections accepted
    h2_open_connections: int = 0  # of which still open
    h2_max_open_connections: int = 0  # the most open at once
    disconnect_times: deque[float] = field(default_factory=lambda: deque(maxlen=100))
    request_ids: deque[str] = field(default_factory=lambda: deque(maxlen=10_000))
    last_request: tuple[str, str, Mapping[str, str], Any] | None = None


class AnswerLog:
    """2xx answers that completed, by request id: how many, and how many ids got more than one.

    Remembers the last ``capacity`` request ids (least recently answered first out), so memory is
    bounded; an answer without an id counts in :attr:`answered` only."""

    def __init__(self, capacity: int = ANSWER_IDS) -> None:
        self.capacity = capacity
        self.answered = 0
        self.answered_twice = 0
        self._counts: OrderedDict[str, int] = OrderedDict()

    def record(self, request_id: str | None) -> None:
        self.answered += 1
        if request_id is None:
            return
        count = self._counts.pop(request_id, 0) + 1
        self._counts[request_id] = count
        if count == 2:
            self.answered_twice += 1
        if len(self._counts) > self.capacity:
            self._counts.popitem(last=False)

    def count(self, request_id: str) -> int:
        return self._counts.get(request_id, 0)


@dataclass(slots=True)
class Call:
    """One counted request, as the handlers see it."""

    request: web.Request
    body: bytes
    json: Any
    knobs: Knobs
    state: MockState
    aborted: bool = False
    disconnected: bool = False
    status: int | None = None  # of the response the handler returned


class MockState:
    """Counters and faults of one mock backend; stored on the app under :data:`STATE_KEY`."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.stats = Stats()
        self.faults = Faults()
        self.answers = AnswerLog()
        self.health_status = 200  # what GET /health answers
        self.health_checks = 0

    def reset(self) -> None:
        open_now = self.stats.h2_open_connections
        self.stats = Stats(
            in_flight=self.stats.in_flight, h2_open_connections=open_now, h2_max_open_connections=open_now
        )
        self.faults = Faults()
        self.answers = AnswerLog()
        self.health_status = 200
        self.health_checks = 0

    def begin(self, request: web.Request, body: bytes, knobs: Knobs) -> Call:
        data = self.record_start(request.method, request.path, request.headers, body)
        return Call(request, body, data, knobs, self)

    def end(self, call: Call) -> None:
        request_id = call.request.headers.get("x-request-id")
        self.record_end(
            aborted=call.aborted, disconnected=call.disconnected, status=call.status, request_id=request_id
        )

    def record_start(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> Any:
        """Count a request (any transport); returns its body parsed as JSON, or None."""
        s = self.stats
        s.requests += 1
        s.by_path[path] += 1
        s.in_flight += 1
        request_id = headers.get("x-request-id")
        if request_id is not None:
            s.request_ids.append(request_id)
        data = _parse_json(body)
        s.last_request = (method, path, headers, data)
        return data

    def record_end(
        self, *, aborted: bool, disconnected: bool, status: int | None = None, request_id: str | None = None
    ) -> None:
        """Count the end of a request (any transport); ``status``: of an answer sent in full."""
        s = self.stats
        s.in_flight -= 1
        if aborted:
            s.resets += 1
        elif disconnected:
            s.disconnects += 1
            s.disconnect_times.append(time.monotonic())
        else:
            s.completed += 1
            if status is not None and 200 <= status < 300:
                self.answers.record(request_id)

    def snapshot(self) -> bytes:
        out: dict[str, Any] = dict(vars(self.stats))
        out["answered"], out["answered_twice"] = self.answers.answered, self.answers.answered_twice
        out["health_status"], out["health_checks"] = self.health_status, self.health_checks
        if self.stats.last_request is not None:
            method, path, headers, data = self.stats.last_request
            out["last_request"] = {"method": method, "path": path, "headers": _lower(headers), "json": data}
        return orjson.dumps(out, default=list)  # the deques


STATE_KEY = web.AppKey("mock_state", MockState)
CallHandler = Callable[[Call], Awaitable[web.StreamResponse]]


def _parse_json(body: bytes) -> Any:
    if body[:1] not in (b"{", b"["):
        return None
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers.items():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


# ---- sending -------------------------------------------------------------------------------------


async def _stall() -> NoReturn:
    await asyncio.get_running_loop().create_future()  # until a disconnect cancels us
    raise AssertionError("unreachable")


async def _abort(call: Call) -> web.StreamResponse:
    call.aborted = True
    if call.request.transport is not None:
        call.request.transport.abort()
    await asyncio.sleep(ABORT_GRACE_S)  # connection_lost cancels this handler first
    return web.Response()


async def _fault(call: Call, sent: int) -> web.StreamResponse:
    if call.knobs.reset_after == sent:
        return await _abort(call)
    await _stall()


async def _send_json(
    call: Call, payload: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.StreamResponse:
    cut = call.knobs.fault_point()
    if cut is None:
        return web.Response(body=payload, status=status, headers=headers, content_type=_JSON)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_type, resp.content_length = _JSON, len(payload)
    try:
        await resp.prepare(call.request)
        if cut:
            await resp.write(payload[:cut])
    except ConnectionResetError:
        call.disconnected = True
        return resp
    return await _fault(call, cut)


async def _send_stream(call: Call, events: Iterator[bytes]) -> web.StreamResponse:
    cut, delay = call.knobs.fault_point(), call.knobs.delay_s
    resp = web.StreamResponse(headers=_SSE_HEADERS)
    resp.enable_chunked_encoding()
    try:
        await resp.prepare(call.request)
        for sent, event in enumerate(events):
            if sent == cut:
                return await _fault(call, sent)
            if sent and delay:
                await asyncio.sleep(delay)
            await resp.write(event)  # one write, so one flush, per event
        await resp.write_eof()
    except ConnectionResetError:
        call.disconnected = True
    return resp


def error_body(status: int, message: str) -> bytes:
    """The OpenAI error shape ``{"error": {"message", "type", "param", "code"}}``."""
    default = ("server_error", None) if status >= 500 else ("invalid_request_error", None)
    kind, code = _ERROR_KINDS.get(status, default)
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


async def _send_error(
    call: Call, status: int, message: str | None = None, retry_after: float | None = None
) -> web.StreamResponse:
    headers = None
    if retry_after is not None:
        headers = {"Retry-After": f"{retry_after:g}", "retry-after-ms": f"{retry_after * 1000:g}"}
    body = error_body(status, message or f"mock backend: injected status {status}")
    return await _send_json(call, body, status, headers)


# ---- request accounting and faults ---------------------------------------------------------------


def _tracked(handler: CallHandler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            knobs = Knobs.parse(request.headers)
        except BadKnob as e:
            return web.Response(status=400, body=error_body(400, str(e)), content_type=_JSON)
        state = request.app[STATE_KEY]
        call = state.begin(request, await request.read(), knobs)
        try:
            response = await _serve(call, handler)
            call.status = response.status
            return response
        except (asyncio.CancelledError, ConnectionResetError):
            call.disconnected = True
            raise
        finally:
            state.end(call)

    return handle


async def _serve(call: Call, handler: CallHandler) -> web.StreamResponse:
    plan = FaultPlan.of(call.request.method, call.knobs, call.state.faults)
    if plan.reset:
        return await _abort(call)
    if plan.first_byte_s > 0:
        await asyncio.sleep(plan.first_byte_s)
    if plan.status is not None:
        return await _send_error(call, plan.status, retry_after=plan.retry_after)
    return await handler(call)


# ---- OpenAI endpoints ----------------------------------------------------------------------------


def _chars(value: object) -> int:
    """Characters of text in a prompt, messages list or input (a token id counts as 4)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, int):
        return 4
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    if isinstance(value, dict):
        return _chars(value.get("content")) + _chars(value.get("text"))
    return 0


def _filler(size: int) -> str:
    return (_FILLER * (size // len(_FILLER) + 1))[:size]


@dataclass(frozen=True, slots=True)
class Generation:
    """One chat (``chat=True``) or text completion, as a body or as stream events."""

    chat: bool
    ident: str
    model: Any
    tokens: int
    usage: dict[str, int]
    content_bytes: int | None
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, stream: bool, choices: list[Any]) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if stream else "chat.completion") if self.chat else "text_completion"
        return {
            "id": self.ident,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def body(self) -> bytes:
        if self.content_bytes is None:
            content = "".join(_WORDS[i % len(_WORDS)] for i in range(self.tokens))
        else:
            content = _filler(self.content_bytes)
        end = {"index": 0, "logprobs": None, "finish_reason": "stop"}
        choice = {"message": {"role": "assistant", "content": content}} if self.chat else {"text": content}
        return orjson.dumps({**self.envelope(False, [{**choice, **end}]), "usage": self.usage})

    def events(self, include_usage: bool) -> Iterator[bytes]:
        first, middle, close, final = _PIECES[self.chat]
        head = orjson.dumps(self.envelope(True, [])).removesuffix(b"[]}")  # ...,"choices":
        head = b"data: " + head + b'[{"index":0,'
        piece = None if self.content_bytes is None else orjson.dumps(_filler(self.content_bytes))
        for i in range(self.tokens):
            content = _WORDS_JSON[i % len(_WORDS_JSON)] if piece is None else piece
            yield head + (middle if i else first) + content + close + _OPEN_TAIL
        yield head + final + _STOP_TAIL
        if include_usage:
            yield b"data: " + orjson.dumps({**self.envelope(True, []), "usage": self.usage}) + b"\n\n"
        yield _SSE_DONE


def plan_generation(chat: bool, data: dict[str, Any], knobs: Knobs, state: MockState) -> Generation:
    """The completion a request body asks for (shared with the h2c server, bench/mock_h2c.py)."""
    limit = data.get("max_tokens") or data.get("max_completion_tokens")
    tokens = min(limit, MAX_TOKENS) if isinstance(limit, int) and limit > 0 else DEFAULT_TOKENS
    tokens = tokens if knobs.chunks is None else knobs.chunks
    prompt = _chars(data.get("messages" if chat else "prompt")) // 4 + 1
    usage = {"prompt_tokens": prompt, "completion_tokens": tokens, "total_tokens": prompt + tokens}
    ident = f"{'chatcmpl' if chat else 'cmpl'}-mock{next(state.ids)}"
    return Generation(chat, ident, data.get("model", MODELS[0]), tokens, usage, knobs.content_bytes)


def stream_usage(data: dict[str, Any]) -> bool:
    options = data.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _generation(chat: bool) -> CallHandler:
    async def handle(call: Call) -> web.StreamResponse:
        data = call.json
        if not isinstance(data, dict):
            return await _send_error(call, 400, "request body must be a JSON object")
        gen = plan_generation(chat, data, call.knobs, call.state)
        if not data.get("stream"):
            return await _send_json(call, gen.body())
        return await _send_stream(call, gen.events(stream_usage(data)))

    return handle


def _embedding(value: object, dims: int, as_base64: bool) -> list[float] | str:
    """A unit float32 vector seeded by a hash of ``value``: the same input, the same vector."""
    rng = random.Random(hashlib.sha256(orjson.dumps(value)).digest())
    vector = [rng.gauss(0.0, 1.0) for _ in range(dims)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    packed = struct.pack(f"<{dims}f", *(x / norm for x in vector))
    return base64.b64encode(packed).decode() if as_base64 else list(struct.unpack(f"<{dims}f", packed))


def embeddings_body(data: Any) -> bytes:
    """The answer to an embeddings request body; raises BadKnob (400) for a bad one."""
    data = data if isinstance(data, dict) else {}
    raw = data.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs:
        raise BadKnob("input: expected a string or a non-empty list of strings")
    dims = data.get("dimensions") or DEFAULT_DIMENSIONS
    if not isinstance(dims, int) or not 0 < dims <= 65536:
        raise BadKnob("dimensions: expected an integer 1..65536")
    as_base64 = data.get("encoding_format") == "base64"  # the openai SDK's default
    items = [
        {"object": "embedding", "index": i, "embedding": _embedding(value, dims, as_base64)}
        for i, value in enumerate(inputs)
    ]
    tokens = _chars(inputs) // 4 + 1
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    body = {"object": "list", "data": items, "model": data.get("model", MODELS[0]), "usage": usage}
    return orjson.dumps(body)


async def _embeddings(call: Call) -> web.StreamResponse:
    try:
        body = embeddings_body(call.json)
    except BadKnob as e:
        return await _send_error(call, 400, str(e))
    return await _send_json(call, body)


async def _models(call: Call) -> web.StreamResponse:
    return await _send_json(call, _MODELS_BODY)


def _form_field(content_type: str, body: bytes, name: str) -> str | None:
    """The value of a multipart/form-data field, without a full multipart parser."""
    boundary = content_type.partition("boundary=")[2].split(";")[0].strip().strip('"')
    if not content_type.startswith("multipart/form-data") or not boundary:
        return None
    marker = f'; name="{name}"'.encode()
    for part in body.split(b"--" + boundary.encode()):
        head, sep, value = part.partition(b"\r\n\r\n")
        if sep and marker in head:
            return value.removesuffix(b"\r\n").decode(errors="replace")
    return None


async def _echo(call: Call) -> web.StreamResponse:
    req = call.request
    model = call.json.get("model") if isinstance(call.json, dict) else None
    if model is None:
        model = _form_field(req.headers.get("Content-Type", ""), call.body, "model")
    body = {
        "object": "mock.echo",
        "method": req.method,
        "path": req.path,
        "raw_path": req.raw_path,
        "query": dict(req.query),
        "query_string": req.query_string,
        "headers": _lower(req.headers),
        "body_len": len(call.body),
        "body_sha256": hashlib.sha256(call.body).hexdigest(),
        "model": model,
    }
    return await _send_json(call, orjson.dumps(body))


# ---- control endpoints and process ---------------------------------------------------------------

_OK = orjson.dumps({"ok": True})


async def _get_stats(request: web.Request) -> web.Response:
    return web.Response(body=request.app[STATE_KEY].snapshot(), content_type=_JSON)


async def _reset(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset()
    return web.Response(body=_OK, content_type=_JSON)


async def _set_faults(request: web.Request) -> web.Response:
    try:
        faults = (
            Faults.from_json(orjson.loads(await request.read())) if request.method == "POST" else Faults()
        )
    except ValueError as e:  # BadKnob and orjson.JSONDecodeError
        return web.Response(status=400, body=error_body(400, str(e)), content_type=_JSON)
    request.app[STATE_KEY].faults = faults
    return web.Response(body=_OK, content_type=_JSON)


async def _health(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.health_checks += 1
    status = state.health_status
    return web.Response(status=status, body=orjson.dumps({"healthy": status < 400}), content_type=_JSON)


async def _set_health(request: web.Request) -> web.Response:
    try:
        status = orjson.loads(await request.read()).get("status")
    except (ValueError, AttributeError):  # orjson.JSONDecodeError; not an object
        status = None
    if not isinstance(status, int) or not 100 <= status <= 599:
        return web.Response(
            status=400, body=error_body(400, 'expected {"status": 100..599}'), content_type=_JSON
        )
    request.app[STATE_KEY].health_status = status
    return web.Response(body=_OK, content_type=_JSON)


def create_app(state: MockState | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state if state is not None else MockState()
    add = app.router.add_route
    add("GET", "/_mock/stats", _get_stats)
    add("POST", "/_mock/reset", _reset)
    add("POST", "/_mock/faults", _set_faults)
    add("DELETE", "/_mock/faults", _set_faults)
    add("POST", "/_mock/health", _set_health)
    add("GET", "/health", _health)
    add("POST", "/v1/chat/completions", _tracked(_generation(chat=True)))
    add("POST", "/v1/completions", _tracked(_generation(chat=False)))
    add("POST", "/v1/embeddings", _tracked(_embeddings))
    add("GET", "/v1/models", _tracked(_models))
    add("*", "/{tail:.*}", _tracked(_echo))
    return app


async def serve(host: str, port: int, h2c: bool = False) -> None:
    """Serve until SIGINT or SIGTERM; print the listening URL once it is bound.

    With ``h2c``, the port also serves HTTP/2 with prior knowledge (bench/mock_h2c.py)."""
    app = create_app()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    both: asyncio.Server | None = None
    try:
        if h2c:
            from bench.mock_h2c import listen  # here: bench.mock_h2c imports this module

            assert runner.server is not None
            both = await listen(app[STATE_KEY], runner.server, host, port)
            bound = both.sockets[0].getsockname()[1]
        else:
            await web.TCPSite(runner, host, port, backlog=1024).start()
            bound = runner.addresses[0][1]
        shown_host = f"[{host}]" if ":" in host else host
        print(f"mock backend listening on http://{shown_host}:{bound}", flush=True)
        await stop.wait()
    finally:
        if both is not None:
            both.close()
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mock_backend", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001, help="0 picks a free port")
    parser.add_argument("--h2c", action="store_true", help="also serve HTTP/2 with prior knowledge")
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port, args.h2c))


if __name__ == "__main__":
    main()
