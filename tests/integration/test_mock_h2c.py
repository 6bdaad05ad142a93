"""The mock backend's h2c mode (``python -m bench.mock_backend --h2c``): HTTP/2 with prior knowledge
and HTTP/1.1 on one port, one set of stats and faults."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import orjson
import pytest
from h2.errors import ErrorCodes

from tests.integration.h2_raw import RawH2
from tests.integration.mock_proc import MockProcess

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def h2c_mock() -> Iterator[MockProcess]:
    with MockProcess(args=["--h2c"]) as proc:
        yield proc


@pytest.fixture(autouse=True)
def _fresh(h2c_mock: MockProcess) -> None:
    h2c_mock.reset()


def test_openai_endpoints_over_h2c(h2c_mock: MockProcess) -> None:
    with httpx.Client(http1=False, http2=True, base_url=h2c_mock.base_url, timeout=5) as client:
        chat = client.post("/chat/completions", json=CHAT, headers={"x-request-id": "r1"})
        assert chat.http_version == "HTTP/2"
        assert chat.json()["choices"][0]["message"]["content"] == "Hello, this is the mock backend."
        with client.stream(
            "POST", "/chat/completions", json={**CHAT, "stream": True}, headers={"x-mock-chunks": "3"}
        ) as stream:
            events = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert len(events) == 5 and events[-1] == "data: [DONE]"
        assert stream.headers["content-type"] == "text/event-stream"
        embeddings = client.post("/embeddings", json={"model": "m", "input": ["a", "b"]}).json()
        assert [len(d["embedding"]) for d in embeddings["data"]] == [8, 8]
        assert [m["id"] for m in client.get("/models").json()["data"]] == ["mock-model-v1", "mock-model-v2"]
        echo = client.put("/files/x?y=1", content=b"abc").json()
        assert (echo["object"], echo["method"], echo["raw_path"], echo["body_len"]) == (
            "mock.echo", "PUT", "/v1/files/x?y=1", 3,
        )  # fmt: skip
        error = client.post(
            "/chat/completions", json=CHAT, headers={"x-mock-status": "429", "x-mock-retry-after": "2"}
        )
        assert (error.status_code, error.headers["retry-after"]) == (429, "2")
        assert error.json()["error"]["code"] == "rate_limit_exceeded"
    stats = h2c_mock.stats()  # over HTTP/1.1, on the same port
    assert stats["completed"] == 6 and "r1" in stats["request_ids"]
    assert stats["by_path"]["/v1/chat/completions"] == 3


def test_h2c_faults_and_disconnects_are_counted(h2c_mock: MockProcess) -> None:
    with RawH2("127.0.0.1", h2c_mock.port) as c:
        reset = c.request(
            "POST", "/v1/chat/completions", {**CHAT, "stream": True}, {"x-mock-reset-after": "2"}
        )
        c.wait(lambda: reset in c.resets)
        assert c.resets[reset] == ErrorCodes.INTERNAL_ERROR
        assert c.bodies[reset].count(b"data: ") == 2
        stalled = c.request(
            "POST", "/v1/chat/completions", {**CHAT, "stream": True}, {"x-mock-stall-after": "1"}
        )
        c.wait(lambda: stalled in c.bodies)
        c.conn.reset_stream(stalled, ErrorCodes.CANCEL)
        cancelled_at = time.monotonic()
        c.flush()
        stats = h2c_mock.wait_stats(lambda s: s["disconnects"] == 1)
        assert stats["resets"] == 1
        assert stats["disconnect_times"][-1] - cancelled_at < 0.1
        big = c.request("POST", "/v1/chat/completions", CHAT, {"x-mock-content-bytes": "300000"})
        status, body = c.json(big)  # more than the 64 KiB default window: flow control works
        assert status == 200 and len(orjson.dumps(body)) > 300_000


def test_h2c_answers_and_status_ratio(h2c_mock: MockProcess) -> None:
    with httpx.Client(http1=False, http2=True, base_url=h2c_mock.base_url, timeout=5) as client:
        for request_id in ("a", "a", "b"):
            reply = client.post("/chat/completions", json=CHAT, headers={"x-request-id": request_id})
            assert reply.status_code == 200
        with client.stream(
            "POST", "/chat/completions", json={**CHAT, "stream": True}, headers={"x-request-id": "b"}
        ) as stream:
            assert stream.read().endswith(b"data: [DONE]\n\n")
        stats = h2c_mock.stats()
        assert (stats["answered"], stats["answered_twice"]) == (4, 2)
        h2c_mock.set_faults(status_ratio={"status": 503, "ratio": 1.0, "retry_after": 1})
        error = client.post("/chat/completions", json=CHAT, headers={"x-request-id": "c"})
        assert (error.status_code, error.headers["retry-after"]) == (503, "1")
    assert h2c_mock.stats()["answered"] == 4
