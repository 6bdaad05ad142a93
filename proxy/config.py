"""Typed configuration: frozen dataclasses built from YAML by ``proxy.config_loader``.

Field metadata drives validation and the reference in README.md:
``help`` (one line), ``min`` / ``max`` (inclusive bounds for numbers), ``min_len`` (strings/lists).
Cross-field rules live in ``validate()`` methods returning ``(relative dotted path, message)`` pairs.
"""

from __future__ import annotations

import dataclasses
import ssl
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit


def opt(default: Any, help: str, **rules: Any) -> Any:
    """A config field with a default, a help line and validation rules."""
    if isinstance(default, dict | list):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help, **rules})
    return field(default=default, metadata={"help": help, **rules})


def req(help: str, **rules: Any) -> Any:
    """A required config field."""
    return field(metadata={"help": help, **rules})


@dataclass(frozen=True)
class TlsConfig:
    cert: str = req("PEM file: the certificate, then any intermediates", min_len=1)
    key: str = req("PEM file: the certificate's private key (unencrypted)", min_len=1)

    def validate(self) -> list[tuple[str, str]]:
        """Load the pair once now, so a bad path or a mismatched key stops the start, not a handshake."""
        problems = [
            (name, f"cannot read {path!r}: {_strerror(path)}")
            for name, path in (("cert", self.cert), ("key", self.key))
            if _strerror(path)
        ]
        if problems:
            return problems
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert, self.key)
        except ssl.SSLError as e:
            return [("", f"cannot use {self.cert!r} with {self.key!r}: {e.reason or e}")]
        return []


class HostPort:
    """``host`` and ``port`` of a config's ``address`` ("host:port", checked by its validate)."""

    address: str

    @property
    def host(self) -> str:
        return split_host_port(self.address)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.address)[1]


@dataclass(frozen=True)
class ListenConfig(HostPort):
    address: str = opt("127.0.0.1:8080", "host:port to listen on ([::1]:8080 for IPv6)")
    backlog: int = opt(1024, "listen(2) backlog", min=1)
    max_connections: int = opt(4096, "client connections served at once; more are closed", min=1)
    tls: TlsConfig | None = opt(None, "serve TLS (ALPN h2 and http/1.1) with this cert and key")

    def validate(self) -> list[tuple[str, str]]:
        try:
            split_host_port(self.address)
        except ValueError as e:
            return [("address", str(e))]
        return []


@dataclass(frozen=True)
class LimitsConfig:
    max_header_bytes: int = opt(65536, "request line + headers; larger gets 431", min=256)
    max_body_bytes: int = opt(8 * 1024 * 1024, "request body; larger gets 413", min=1)
    header_timeout_s: float = opt(10.0, "time to receive a request's headers; then 408", min=0.001)
    body_timeout_s: float = opt(60.0, "time to receive a request's body after its headers", min=0.001)
    keepalive_timeout_s: float = opt(75.0, "idle client connection is closed after this", min=0.001)
    max_pipelined: int = opt(16, "parsed-but-unanswered requests per connection", min=1)


@dataclass(frozen=True)
class Http2Config:
    """The HTTP/2 front (h2c with prior knowledge on the listener; h2 by ALPN with ``listen.tls``)."""

    enabled: bool = opt(True, "serve HTTP/2 beside HTTP/1.1 on the same listener")
    max_concurrent_streams: int = opt(
        100, "streams a client may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS)", min=1, max=2**31 - 1
    )
    max_header_list_size: int = opt(
        65536, "decoded request headers of one stream (SETTINGS_MAX_HEADER_LIST_SIZE)", min=1024
    )
    max_header_block_bytes: int = opt(
        131072, "encoded header block incl. CONTINUATION frames; more → GOAWAY ENHANCE_YOUR_CALM", min=1024
    )
    initial_window_size: int = opt(
        1024 * 1024, "receive window of each stream (request bodies)", min=65535, max=2**31 - 1
    )
    connection_window_size: int = opt(
        16 * 1024 * 1024, "receive window of the connection", min=65535, max=2**31 - 1
    )
    stream_buffer_bytes: int = opt(
        65536,
        "response bytes queued per stream past the client's window; above, the upstream waits",
        min=1024,
    )
    send_timeout_s: float = opt(
        120.0, "a stream the client lets nothing through for this long is reset (CANCEL)", min=0.001
    )
    rapid_reset_limit: int = opt(
        200, "in-flight streams a client may cancel per window; more → GOAWAY ENHANCE_YOUR_CALM", min=1
    )
    rapid_reset_window_s: float = opt(10.0, "the window for rapid_reset_limit", min=0.001)
    control_frame_limit: int = opt(
        1000,
        "PING/SETTINGS/PRIORITY/WINDOW_UPDATE/empty DATA frames per window beyond twice the streams and "
        "DATA frames the sidecar sent in it; more → GOAWAY ENHANCE_YOUR_CALM",
        min=1,
    )
    control_frame_window_s: float = opt(10.0, "the window for control_frame_limit", min=0.001)
    idle_timeout_s: float = opt(
        75.0, "a connection without open streams is closed (GOAWAY) after this", min=0.1
    )
    max_send_buffer_bytes: int = opt(
        1024 * 1024, "bytes waiting in the socket for a client that stopped reading; more → closed", min=65536
    )
    max_buffered_body_bytes: int = opt(
        32 * 1024 * 1024,
        "request body bytes one connection holds (all its streams); above, received DATA is not "
        "acknowledged until requests complete (at least limits.max_body_bytes)",
        min=65536,
    )


@dataclass(frozen=True)
class HealthCheckConfig:
    """An upstream's active health check (proxy/health.py): GET ``path`` every ``interval_s``."""

    path: str = opt("/health", "GET after the upstream url (its prefix too); a 2xx answer passes", min_len=1)
    interval_s: float = opt(5.0, "time between the end of one check and the start of the next", min=0.05)
    timeout_s: float = opt(1.0, "connect + answer's status line; later is a failed check", min=0.001)
    unhealthy_after: int = opt(2, "failed checks in a row that mark the upstream down", min=1, max=100)
    healthy_after: int = opt(1, "passed checks in a row that mark a down upstream up again", min=1, max=100)

    def validate(self) -> list[tuple[str, str]]:
        if not self.path.startswith("/") or any(c in self.path for c in " \r\n"):
            return [("path", f"must start with '/' and hold no spaces or line breaks, got {self.path!r}")]
        return []


@dataclass(frozen=True)
class UpstreamConfig:
    url: str = req("base URL: http://host:port or https://host[:port][/prefix], without the /v1")
    api_key: str = opt("", "sent as 'Authorization: Bearer …', replacing the client's credential")
    max_connections: int = opt(128, "connections open to this upstream at once", min=1)
    idle_timeout_s: float = opt(
        4.0, "close idle pooled connections after this (below the backend's own keep-alive)", min=0.0
    )
    max_pending: int = opt(1024, "requests waiting for a connection; more get 503", min=0)
    pool_timeout_s: float = opt(10.0, "wait for a free connection before 503", min=0.0)
    connect_timeout_s: float = opt(5.0, "TCP (+TLS) connect; then 502", min=0.001)
    first_byte_timeout_s: float = opt(
        600.0, "request sent → response head; non-streaming LLM calls need long; then 504", min=0.001
    )
    read_timeout_s: float = opt(120.0, "longest gap between body chunks; then the stream is cut", min=0.001)
    total_timeout_s: float = opt(
        1800.0,
        "request sent → response complete, streams included; then 504, or a stream ends with an error",
        min=0.001,
    )
    protocol: Literal["http1", "h2c", "h2", "auto"] = opt(
        "auto", "http1; h2c (HTTP/2 on http://); h2 (HTTP/2 on https://); auto: ALPN on https, else http1"
    )
    h2_window_bytes: int = opt(
        1024 * 1024,
        "HTTP/2: receive window per stream; response bytes held for a slow client before the stream waits",
        min=65535,
        max=2**31 - 1,
    )
    h2_connection_window_bytes: int = opt(
        16 * 1024 * 1024, "HTTP/2: receive window of each connection", min=65535, max=2**31 - 1
    )
    h2_ping_interval_s: float = opt(
        10.0, "HTTP/2: a connection silent this long is sent a PING (also before reuse)", min=0.001
    )
    h2_ping_timeout_s: float = opt(5.0, "HTTP/2: no frame back this long after a PING → closed", min=0.001)
    health: HealthCheckConfig | None = opt(
        None, "active health check {path, interval_s, timeout_s, unhealthy_after, healthy_after}; none: off"
    )

    def validate(self) -> list[tuple[str, str]]:
        try:
            address = parse_upstream_url(self.url)
        except ValueError as e:
            return [("url", str(e))]
        if address.prefix == b"/v1" or address.prefix.endswith(b"/v1"):
            # The SDK's base URL, an easy slip: the forwarder sends the client's /v1/... after it.
            instead = self.url.rstrip("/").removesuffix("/v1")
            return [
                (
                    "url",
                    "must not end in /v1: the client's path (/v1/...) is sent after it, so requests "
                    f"would go to /v1/v1/...; write {instead!r}",
                )
            ]
        if self.protocol == "h2c" and address.scheme != "http":
            return [("protocol", "h2c is HTTP/2 without TLS: use an http:// url, or protocol h2 for https")]
        if self.protocol == "h2" and address.scheme != "https":
            return [("protocol", "h2 is HTTP/2 over TLS: use an https:// url, or protocol h2c for http")]
        return []


@dataclass(frozen=True)
class TargetConfig:
    upstream: str = req("name of an entry under `upstreams`")
    model: str = req("model name sent to that upstream", min_len=1)
    weight: float = opt(1.0, "share of traffic, relative to the route's other targets", min=0.0)


@dataclass(frozen=True)
class RouteConfig:
    model: str = req("model name the client sends", min_len=1)
    targets: tuple[TargetConfig, ...] = req("where requests for this model go", min_len=1)
    fallbacks: tuple[str, ...] = opt(
        (), "other routes (client model names) tried in order when no target of this one can serve"
    )

    def validate(self) -> list[tuple[str, str]]:
        if self.targets and sum(t.weight for t in self.targets) <= 0:
            return [("targets", "at least one target needs a weight > 0")]
        return []


@dataclass(frozen=True)
class MiddlewareEntry:
    """One ``middleware:`` item: its ``type`` and the already-built config of that middleware."""

    type: str
    config: Any  # the middleware's own frozen config dataclass
    factory: Any  # the class named by ``type``, resolved through proxy.registry


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = opt("info", "log level")
    access_log: bool = opt(False, "one line per request, when its response is complete")
    format: Literal["text", "json"] = opt("text", "text: human-readable lines; json: one object a line")
    bodies: bool = opt(
        False, "access lines carry the request and response bodies (≤ 64 KiB each): prompts, completions"
    )


@dataclass(frozen=True)
class AdminConfig(HostPort):
    """The admin listener (a port of its own, HTTP/1.1): /metrics, /healthz, /readyz."""

    enabled: bool = opt(True, "serve the admin listener; off: no metrics are counted either")
    address: str = opt(
        "127.0.0.1:9090", "host:port of the admin listener, never the proxy's (port 0: a free one)"
    )
    token: str = opt(
        "", "bearer token every admin path but /healthz requires (use ${ENV}); empty: none required"
    )
    duration_buckets_s: tuple[float, ...] = opt(
        (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        "upper bounds of gen_ai_client_operation_duration_seconds' buckets, increasing",
        min_len=1,
    )

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        try:
            split_host_port(self.address)
        except ValueError as e:
            problems.append(("address", str(e)))
        bounds = self.duration_buckets_s
        if any(b <= 0 for b in bounds) or sorted(set(bounds)) != list(bounds):
            problems.append(("duration_buckets_s", f"must be > 0 and increasing, got {list(bounds)}"))
        return problems


@dataclass(frozen=True)
class Config:
    upstreams: dict[str, UpstreamConfig] = req("named backends", min_len=1)
    routes: tuple[RouteConfig, ...] = req("client model name → targets", min_len=1)
    listen: ListenConfig = opt(ListenConfig(), "where the sidecar listens")
    limits: LimitsConfig = opt(LimitsConfig(), "client-side limits and timeouts")
    http2: Http2Config = opt(Http2Config(), "the HTTP/2 front: streams, windows, flood limits")
    default_upstream: str | None = opt(
        None, "upstream for requests that name no model (files, batches); defaults to the only one"
    )
    middleware: tuple[MiddlewareEntry, ...] = opt((), "the chain, in order")
    log: LogConfig = opt(LogConfig(), "logging")
    admin: AdminConfig = opt(AdminConfig(), "the admin listener: metrics, health, readiness")
    drain_timeout_s: float = opt(
        30.0, "on SIGTERM/SIGINT: how long in-flight requests and streams may take to finish", min=0.0
    )
    server_timing: bool = opt(
        False, "answers carry 'Server-Timing: proxy;dur=…, upstream;dur=…' (ms; tells clients your timings)"
    )
    source: str = field(default="<memory>", compare=False)  # the file it came from

    def validate(self) -> list[tuple[str, str]]:
        problems: list[tuple[str, str]] = []
        seen: dict[str, int] = {}
        for i, route in enumerate(self.routes):
            if route.model in seen:
                problems.append((f"routes[{i}].model", f"duplicate of routes[{seen[route.model]}].model"))
            seen.setdefault(route.model, i)
            for j, t in enumerate(route.targets):
                if t.upstream not in self.upstreams:
                    problems.append(
                        (
                            f"routes[{i}].targets[{j}].upstream",
                            f"unknown upstream {t.upstream!r}; known: {', '.join(sorted(self.upstreams))}",
                        )
                    )
        for i, route in enumerate(self.routes):
            for j, name in enumerate(route.fallbacks):
                if name == route.model:
                    problems.append((f"routes[{i}].fallbacks[{j}]", "a route cannot fall back to itself"))
                elif name not in seen:
                    problems.append(
                        (f"routes[{i}].fallbacks[{j}]", f"unknown route {name!r}; known: {', '.join(seen)}")
                    )
        for i, entry in enumerate(self.middleware):
            problems.extend(_unknown_upstreams(entry.config, f"middleware[{i}]", self.upstreams))
        if self.admin.enabled and _same_socket(self.admin.address, self.listen.address):
            problems.append(
                (
                    "admin.address",
                    f"{self.admin.address!r} is where the proxy listens (listen.address): the admin "
                    "listener needs a port of its own",
                )
            )
        if self.default_upstream is not None and self.default_upstream not in self.upstreams:
            known = ", ".join(sorted(self.upstreams))
            problems.append(
                ("default_upstream", f"unknown upstream {self.default_upstream!r}; known: {known}")
            )
        return problems

    @property
    def fallback_upstream(self) -> str | None:
        """Where a request without a model goes: ``default_upstream``, else the only upstream."""
        if self.default_upstream is not None:
            return self.default_upstream
        if len(self.upstreams) == 1:
            return next(iter(self.upstreams))
        return None


def _unknown_upstreams(config: Any, path: str, upstreams: dict[str, UpstreamConfig]) -> list[tuple[str, str]]:
    """A middleware's fields declared with ``upstream=True`` (``opt(..., upstream=True)``) must name
    configured upstreams: a slip is a config error with its line, not a failure at build time."""
    if not dataclasses.is_dataclass(config):
        return []
    problems = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not f.metadata.get("upstream") or value is None:
            continue
        for name in (value,) if isinstance(value, str) else value:
            if name not in upstreams:
                known = ", ".join(sorted(upstreams))
                problems.append((f"{path}.{f.name}", f"unknown upstream {name!r}; known: {known}"))
    return problems


def _strerror(path: str) -> str:
    """Why ``path`` cannot be read as a file, or "" when it can."""
    try:
        with open(path, "rb"):
            return ""
    except OSError as e:
        return e.strerror or str(e)


def _same_socket(a: str, b: str) -> bool:
    """Would listeners on ``a`` and ``b`` (host:port) collide? Port 0 never does (each gets its own)."""
    try:
        (host_a, port_a), (host_b, port_b) = split_host_port(a), split_host_port(b)
    except ValueError:
        return False  # reported on its own key
    wildcard = ("", "0.0.0.0", "::")
    return port_a == port_b != 0 and (host_a == host_b or host_a in wildcard or host_b in wildcard)


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be host:port, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port must be a number 0-65535, got {port!r}")
    return host, int(port)


@dataclass(frozen=True)
class UpstreamAddress:
    scheme: Literal["http", "https"]
    host: str
    port: int
    prefix: bytes  # path prefix without trailing slash, e.g. b"" or b"/openai"
    host_header: bytes


def parse_upstream_url(url: str) -> UpstreamAddress:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"scheme must be http or https, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"has no host: {url!r}")
    if parts.query or parts.fragment or parts.username:
        raise ValueError(f"must not carry a query, fragment or credentials: {url!r}")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"has a bad port: {url!r}") from None
    scheme: Literal["http", "https"] = "https" if parts.scheme == "https" else "http"
    return UpstreamAddress(
        scheme=scheme,
        host=parts.hostname,
        port=port,
        prefix=parts.path.rstrip("/").encode(),
        host_header=parts.netloc.rsplit("@", 1)[-1].encode(),
    )
