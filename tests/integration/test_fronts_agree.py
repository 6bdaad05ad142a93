"""The same requests over HTTP/1.1 and h2c get the same answers: both fronts call one request
driver (proxy/server/driver.py) for request ids, the answers the sidecar gives itself, the mapping
of failures to answers and the early refusals. Each case runs on both protocols through the real
sidecar and the mock backend, and the two answers are compared as well as checked."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest

from tests.h1_response import H1Response
from tests.integration.h2_raw import RawH2
from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config

MAX_BODY = 4096
EXTRA = (
    f"limits: {{max_body_bytes: {MAX_BODY}, max_header_bytes: 2048}}\n"
    'middleware:\n  - {type: "tests.unit.sample_middleware:Cancels", when: "cancel"}\n'
)
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def agreeing(mock: MockProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    workdir: Path = tmp_path_factory.mktemp("fronts")
    with SidecarProcess(minimal_config(mock.url, extra=EXTRA), workdir) as proc:
        yield proc


@dataclass
class Answer:
    status: int
    headers: dict[bytes, bytes]
    body: bytes

    def error(self) -> tuple[str, str | None, str | None]:
        err = orjson.loads(self.body)["error"]
        return err["type"], err.get("code"), err.get("param")


def ask_h1(sidecar: SidecarProcess, method: str, path: str, body: bytes, headers: dict[str, str]) -> Answer:
    lines = [f"{method} {path} HTTP/1.1", "host: sidecar", *(f"{k}: {v}" for k, v in headers.items())]
    if body or method == "POST":
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    with socket.create_connection((sidecar.host, sidecar.port), timeout=5) as sock:
        sock.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        reader = H1Response()
        if method == "HEAD":
            reader.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # no body follows
        while not reader.done:
            data = sock.recv(65536)
            if not data:
                break
            reader.feed(data)
            if method == "HEAD" and reader.headers:
                break
        return Answer(reader.status, reader.headers, bytes(reader.body))


def ask_h2(sidecar: SidecarProcess, method: str, path: str, body: bytes, headers: dict[str, str]) -> Answer:
    with RawH2(sidecar.host, sidecar.port) as client:
        sid = client.request(method, path, body or None, headers)
        status, head, got = client.response(sid)
        return Answer(status, {k: v for k, v in head.items() if not k.startswith(b":")}, got)


ASK = {"h1": ask_h1, "h2c": ask_h2}


def both(
    sidecar: SidecarProcess, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> list[Answer]:
    return [ASK[p](sidecar, method, path, body, headers or {}) for p in ("h1", "h2c")]


def test_healthz_answers_get_and_head_alike(agreeing: SidecarProcess) -> None:
    for method in ("GET", "HEAD"):
        answers = both(agreeing, method, "/healthz")
        for a in answers:
            assert a.status == 200, (method, a)
            assert a.headers[b"content-type"] == b"application/json"
            assert a.headers.get(b"x-request-id"), (method, a.headers)
            assert a.body == (b'{"status":"ok"}' if method == "GET" else b"")


def test_a_cancellation_inside_the_chain_is_a_500_on_both(agreeing: SidecarProcess) -> None:
    body = orjson.dumps(CHAT)
    answers = both(agreeing, "POST", "/v1/chat/completions", body, {"x-test": "cancel"})
    for a in answers:
        assert a.status == 500, a
        assert a.error()[0] == "server_error", a.body
        assert a.headers.get(b"x-request-id")
    assert answers[0].body == answers[1].body


@pytest.mark.parametrize(
    ("path", "body", "status", "kind"),
    [
        ("/nowhere", orjson.dumps(CHAT), 404, "invalid_request_error"),
        ("/v1/chat/completions", b"{not json", 400, "invalid_request_error"),
        (
            "/v1/chat/completions",
            orjson.dumps({**CHAT, "model": "no-such-model"}),
            404,
            "invalid_request_error",
        ),
    ],
)
def test_errors_of_the_chain_are_the_same_on_both(
    agreeing: SidecarProcess, path: str, body: bytes, status: int, kind: str
) -> None:
    answers = both(agreeing, "POST", path, body)
    for a in answers:
        assert a.status == status, a
        assert a.error()[0] == kind
        assert a.headers[b"content-type"] == b"application/json"
        assert a.headers.get(b"x-request-id")
    assert answers[0].body == answers[1].body


def test_a_body_over_the_limit_is_a_413_with_a_request_id_on_both(agreeing: SidecarProcess) -> None:
    big = b'{"model": "demo-model", "pad": "' + b"x" * MAX_BODY + b'"}'
    answers = both(agreeing, "POST", "/v1/chat/completions", big, {"x-request-id": "mine-413"})
    for a in answers:
        assert a.status == 413, a
        assert a.headers.get(b"x-request-id") == b"mine-413", a.headers
        assert f"{MAX_BODY} bytes" in orjson.loads(a.body)["error"]["message"]
    assert answers[0].body == answers[1].body


def test_oversized_headers_are_a_431_with_a_request_id(agreeing: SidecarProcess) -> None:
    # (HTTP/2 bounds a header list by SETTINGS_MAX_HEADER_LIST_SIZE instead: see test_h2_front.py)
    a = ask_h1(agreeing, "GET", "/v1/models", b"", {"x-big": "b" * 4096})
    assert a.status == 431, a
    assert a.headers.get(b"x-request-id")


def test_request_ids_are_kept_or_replaced_alike(agreeing: SidecarProcess) -> None:
    body = orjson.dumps(CHAT)
    for a in both(agreeing, "POST", "/v1/chat/completions", body, {"x-request-id": "client-id-1"}):
        assert a.status == 200, a
        assert a.headers[b"x-request-id"] == b"client-id-1"
    for a in both(agreeing, "POST", "/v1/chat/completions", body, {"x-request-id": "r" * 300}):
        assert a.status == 200, a
        rid = a.headers[b"x-request-id"]
        assert rid != b"r" * 300 and 0 < len(rid) <= 200
    first, second = both(agreeing, "POST", "/v1/chat/completions", body)
    assert first.headers[b"x-request-id"] != second.headers[b"x-request-id"]


def test_the_backend_server_header_does_not_reach_the_client(agreeing: SidecarProcess) -> None:
    for a in both(agreeing, "POST", "/v1/chat/completions", orjson.dumps(CHAT)):
        assert a.status == 200, a
        assert b"server" not in a.headers, a.headers
