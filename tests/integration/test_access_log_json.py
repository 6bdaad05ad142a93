"""JSON logs and the access log through the real sidecar, the mock backend and the openai SDK."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config

PROMPT = "the distinctive prompt zebra-quokka-4711"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
COMPLETION = "this is the mock backend"  # the mock's non-stream answer: "Hello, this is the mock backend."
JSON_LOGS = "log: {access_log: true, format: json}\n"


@pytest.fixture(autouse=True)
def _fresh_mock(mock: MockProcess) -> None:
    mock.reset()


def access_lines(sidecar: SidecarProcess, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The first ``count`` access lines, once the log thread has written them (it writes a moment
    after the answer went out)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in sidecar.logs().splitlines() if line.strip()]
        access = [line for line in lines if line["logger"] == "llm_sidecar.access"]
        if len(access) >= count:
            return access
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(access)} access lines, not {count}, in:\n{sidecar.logs()}")
        time.sleep(0.02)


def test_one_json_line_per_request_without_prompt_or_completion(mock: MockProcess, tmp_path: Path) -> None:
    with (
        SidecarProcess(minimal_config(mock.url, extra=JSON_LOGS), tmp_path) as sidecar,
        OpenAI(base_url=sidecar.base_url, api_key="sk-secret-client-key", max_retries=0) as client,
    ):
        reply = client.chat.completions.create(
            model="demo-model", messages=MESSAGES, extra_headers={"x-request-id": "r-whole"}
        )
        assert reply.usage is not None and COMPLETION in (reply.choices[0].message.content or "")
        stream = client.chat.completions.create(
            model="demo-model",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers={"x-request-id": "r-stream", "x-mock-chunks": "5"},
        )
        stream_usage = None
        for chunk in stream:
            if chunk.usage is not None:
                stream_usage = chunk.usage
        assert stream_usage is not None
        whole, streamed = access_lines(sidecar, 2)
        log = sidecar.logs()

    # Every line is JSON, the event lines too (the start-up line among them).
    events = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert any("listening on" in e.get("message", "") for e in events)
    assert {"time", "level", "logger", "message"} <= set(events[0])
    assert len([e for e in events if e["logger"] == "llm_sidecar.access"]) == 2

    for line in (whole, streamed):
        assert (line["route"], line["upstream"], line["model"]) == ("demo-model", "mock", "mock-model-v1")
        assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/chat/completions", 200)
        assert line["client"].startswith("127.0.0.1:")
        assert line["attempts"] == 1 and line["bytes_in"] > len(PROMPT)
        assert line["bytes_out"] > 0 and line["duration_ms"] > 0
        assert "error_type" not in line and "outcome" not in line and "cache" not in line
        assert (line["tenant"], line["identity"]) == (None, None)  # no auth middleware
    assert whole["request_id"] == "r-whole" and streamed["request_id"] == "r-stream"
    assert (whole["tokens_in"], whole["tokens_out"]) == (
        reply.usage.prompt_tokens,
        reply.usage.completion_tokens,
    )
    assert (streamed["tokens_in"], streamed["tokens_out"]) == (stream_usage.prompt_tokens, 5)
    assert "ttft_ms" not in whole
    assert 0 < streamed["ttft_ms"] <= streamed["duration_ms"]
    assert PROMPT not in log and "zebra" not in log
    assert COMPLETION not in log and '" backend"' not in log  # the stream's last word
    assert "sk-secret-client-key" not in log


def test_bodies_true_logs_the_prompt_and_the_completion(mock: MockProcess, tmp_path: Path) -> None:
    config = minimal_config(mock.url, extra="log: {access_log: true, format: json, bodies: true}\n")
    with (
        SidecarProcess(config, tmp_path) as sidecar,
        OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0) as client,
    ):
        client.chat.completions.create(model="demo-model", messages=MESSAGES)
        stream = client.chat.completions.create(model="demo-model", messages=MESSAGES, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert COMPLETION in text
        whole, streamed = access_lines(sidecar, 2)
    for line in (whole, streamed):
        assert PROMPT in line["request_body"]
    assert COMPLETION in whole["response_body"]
    assert '" backend"' in streamed["response_body"] and "data: [DONE]" in streamed["response_body"]


def test_a_client_that_leaves_mid_stream_is_logged_client_closed(mock: MockProcess, tmp_path: Path) -> None:
    with SidecarProcess(minimal_config(mock.url, extra=JSON_LOGS), tmp_path) as sidecar:
        body = {"model": "demo-model", "messages": MESSAGES, "stream": True}
        headers = {"x-mock-chunks": "50", "x-mock-delay-ms": "50", "x-request-id": "r-gone"}
        with (
            httpx.Client(base_url=sidecar.url, timeout=5) as http,
            http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response,
        ):
            assert response.status_code == 200
            next(response.iter_raw())  # the first chunk came; then the client goes
        [line] = access_lines(sidecar, 1)
    assert (line["request_id"], line["status"], line["outcome"]) == ("r-gone", 200, "client_closed")
    assert line["bytes_out"] > 0 and line["duration_ms"] < 2000  # cut, not the 2.5 s the stream would take
    mock.wait_stats(lambda s: s["disconnects"] == 1)  # and the upstream call was cancelled
