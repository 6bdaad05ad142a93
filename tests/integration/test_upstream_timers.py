"""The HTTP/1.1 upstream's one timer per connection, when the head and read timeouts differ and a
connection is reused after a stream (the real sidecar and mock, the openai SDK)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config

HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProcess]:
    with MockProcess() as proc:
        yield proc


@pytest.fixture(scope="module")
def client(mock: MockProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenAI]:
    config = minimal_config(mock.url, upstream_extra=", first_byte_timeout_s: 0.3, read_timeout_s: 3")
    with (
        SidecarProcess(config, tmp_path_factory.mktemp("timers")) as sidecar,
        OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0) as sdk,
    ):
        yield sdk


def stream(client: OpenAI, delay_ms: int) -> str:
    chunks = client.chat.completions.create(
        model="demo-model",
        messages=HI,
        stream=True,
        extra_headers={"x-mock-chunks": "3", "x-mock-delay-ms": str(delay_ms)},
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_a_gap_longer_than_the_head_timeout_but_shorter_than_the_read_timeout_is_not_cut(
    client: OpenAI,
) -> None:
    # The head (with the first event) comes at once, the next event 0.45 s later: the head's
    # timer (0.3 s) fires in that gap, and must not take it for a stall (read_timeout_s is 3).
    for _ in range(2):
        assert stream(client, 450)


def test_the_head_timeout_holds_on_a_connection_reused_after_a_stream(client: OpenAI) -> None:
    # Events 0.2 s apart: the head's timer (0.3 s) sees bytes and looks again 3 s later; that
    # timer outlives the stream on the pooled connection.
    assert stream(client, 200)
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model="demo-model", messages=HI, extra_headers={"x-mock-first-byte-ms": "2500"}
        )
    assert info.value.status_code == 504
    assert time.monotonic() - started < 1.5  # the 0.3 s head timeout, not the stream's 3 s timer
