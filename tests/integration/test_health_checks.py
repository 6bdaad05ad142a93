"""Active health checks through the real sidecar, with two mock backends behind one route and no
circuit_breaker: the upstream failing its check gets no traffic and /readyz says why; with both
down the route answers 503 and /readyz is 503; traffic returns once a check passes again. A reload
that drops an upstream's check gives it traffic again."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess
from tests.integration.test_admin import admin_url

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
CHECK = "health: {path: /health, interval_s: 0.1, timeout_s: 1, unhealthy_after: 2, healthy_after: 1}"
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def second() -> Iterator[MockProcess]:
    with MockProcess() as proc:
        yield proc


def config(a: str, b: str, b_check: str = CHECK) -> str:
    b_entry = f'{{url: "{b}", {b_check}}}' if b_check else f'{{url: "{b}"}}'
    return (
        'listen: {address: "127.0.0.1:0"}\n'
        'admin: {address: "127.0.0.1:0"}\n'
        "upstreams:\n"
        f'  a: {{url: "{a}", {CHECK}}}\n'
        f"  b: {b_entry}\n"
        "routes:\n"
        "  - {model: demo-model, targets: [{upstream: a, model: m}, {upstream: b, model: m}]}\n"
    )


def served(client: OpenAI, a: MockProcess, b: MockProcess, n: int = 20) -> tuple[int, int]:
    """Send ``n`` requests; how many each backend answered."""
    before = a.stats()["by_path"].get(CHAT, 0), b.stats()["by_path"].get(CHAT, 0)
    for _ in range(n):
        client.chat.completions.create(model="demo-model", messages=MESSAGES)
    return a.stats()["by_path"].get(CHAT, 0) - before[0], b.stats()["by_path"].get(CHAT, 0) - before[1]


def test_an_upstream_failing_its_check_gets_no_traffic_until_it_passes(
    mock: MockProcess, second: MockProcess, tmp_path: Path
) -> None:
    a, b = mock, second
    a.reset()
    b.reset()
    with SidecarProcess(config(a.url, b.url), tmp_path) as sidecar:
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        readyz = admin_url(sidecar) + "/readyz"
        b.wait_stats(lambda s: s["health_checks"] >= 2)  # the checks run from the start
        to_a, to_b = served(client, a, b)
        assert to_a > 0 and to_b > 0

        b.set_health(503)
        sidecar.wait_log(
            "upstream b failed its health check: down, no traffic until it passes (GET /health answered 503)"
        )
        assert served(client, a, b) == (20, 0)
        assert httpx.get(readyz).json() == {"ready": True}  # a still serves the route

        a.set_health(500)
        sidecar.wait_log("upstream a failed its health check")
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="demo-model", messages=MESSAGES)
        assert e.value.status_code == 503
        assert "each failed its health check" in str(e.value)
        response = httpx.get(readyz)
        assert response.status_code == 503
        assert response.json()["problems"] == [
            "route demo-model: no target available (upstream a failed its health check: GET /health answered "
            "500; upstream b failed its health check: GET /health answered 503)"
        ]

        b.set_health(200)
        sidecar.wait_log("upstream b passed its health check: up again, taking traffic")
        assert httpx.get(readyz).status_code == 200
        assert served(client, a, b) == (0, 20)
        a.set_health(200)
        sidecar.wait_log("upstream a passed its health check")
        to_a, to_b = served(client, a, b)
        assert to_a > 0 and to_b > 0
        logs = sidecar.logs()
        assert logs.count("upstream b failed its health check") == 1  # once per change, not per check


def test_a_reload_that_drops_a_check_gives_the_upstream_traffic_again(
    mock: MockProcess, second: MockProcess, tmp_path: Path
) -> None:
    a, b = mock, second
    a.reset()
    b.reset()
    b.set_health(503)
    with SidecarProcess(config(a.url, b.url), tmp_path) as sidecar:
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        sidecar.wait_log("upstream b failed its health check")
        assert served(client, a, b, 10) == (10, 0)
        assert sidecar.reload(config(a.url, b.url, b_check=""))
        assert "upstream b: no health check any more; taking traffic" in sidecar.logs()
        checks = b.stats()["health_checks"]
        to_a, to_b = served(client, a, b)
        assert to_a > 0 and to_b > 0
        assert b.stats()["health_checks"] <= checks + 1  # its loop stopped (one may have been on its way)
