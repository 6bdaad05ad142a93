"""SIGHUP reloads the config file without dropping a request: the new routes serve at once, an
invalid file is rejected with check-config's messages while the old config goes on, state whose
config did not change carries over, and requests in flight across reloads all complete."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import httpx2
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def config(mock_url: str, *, upstream: str = "mock-a", extra_route: str | None = None, tail: str = "") -> str:
    """Two names for the mock (a reload can move the route between them, so a pool is removed
    while its streams are in flight), the demo route, and optionally one more route."""
    routes = f"  - {{model: demo-model, targets: [{{upstream: {upstream}, model: mock-model-v1}}]}}\n"
    if extra_route is not None:
        routes += (
            f"  - {{model: {extra_route}, targets: [{{upstream: {upstream}, model: {extra_route}-v1}}]}}\n"
        )
    return (
        'listen: {address: "127.0.0.1:0"}\n'
        "upstreams:\n"
        f'  mock-a: {{url: "{mock_url}"}}\n'
        f'  mock-b: {{url: "{mock_url}"}}\n'
        f"routes:\n{routes}{tail}"
    )


def test_a_reload_serves_the_new_routes_at_once(mock: MockProcess, tmp_path: Path) -> None:
    with SidecarProcess(config(mock.url), tmp_path) as sidecar:
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="added", messages=MESSAGES)
        assert sidecar.reload(config(mock.url, extra_route="added"))
        reply = client.chat.completions.create(model="added", messages=MESSAGES)
        assert reply.model == "added-v1"  # what the mock was asked for: the new target's model
        assert client.chat.completions.create(model="demo-model", messages=MESSAGES).model == "mock-model-v1"
        sidecar.wait_log("routes: demo-model → mock-a/mock-model-v1 (1); added → mock-a/added-v1 (1)")


def test_an_invalid_file_is_rejected_and_the_old_config_serves_on(mock: MockProcess, tmp_path: Path) -> None:
    with SidecarProcess(config(mock.url), tmp_path) as sidecar:
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        broken = config(mock.url).replace("model: mock-model-v1}", "model: mock-model-v1, weight: -1}")
        assert not sidecar.reload(broken)
        logs = sidecar.logs()
        assert "reload of" in logs and "rejected; still serving the config before it" in logs
        assert "config.yaml:6: routes[0].targets[0].weight: must be" in logs  # check-config's message
        assert not sidecar.reload("routes: [unclosed\n")  # not even YAML
        assert client.chat.completions.create(model="demo-model", messages=MESSAGES).model == "mock-model-v1"
        assert sidecar.reload(config(mock.url, extra_route="after"))  # and a good file after that works
        assert client.chat.completions.create(model="after", messages=MESSAGES).model == "after-v1"


def test_a_change_that_needs_a_restart_is_said_and_the_rest_applied(
    mock: MockProcess, tmp_path: Path
) -> None:
    with SidecarProcess(config(mock.url), tmp_path) as sidecar:
        moved = config(mock.url, extra_route="added").replace("127.0.0.1:0", "127.0.0.1:1")
        assert sidecar.reload(moved)
        sidecar.wait_log("listen: changed, but it takes a restart; still as before")
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        assert client.chat.completions.create(model="added", messages=MESSAGES).model == "added-v1"


def test_state_whose_config_did_not_change_carries_over(mock: MockProcess, tmp_path: Path) -> None:
    """A rate limit's bucket is not refilled by a reload that leaves rate_limit as it was, and starts
    afresh when its config changes."""
    limit = "middleware:\n  - {type: rate_limit, requests_per_minute: %d, burst: 1}\n"
    with SidecarProcess(config(mock.url, tail=limit % 3), tmp_path) as sidecar:
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        for _ in range(3):
            client.chat.completions.create(model="demo-model", messages=MESSAGES)
        assert sidecar.reload(config(mock.url, extra_route="added", tail=limit % 3))
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="demo-model", messages=MESSAGES)
        assert sidecar.reload(config(mock.url, extra_route="added", tail=limit % 4))
        client.chat.completions.create(model="demo-model", messages=MESSAGES)  # a new bucket


def test_1000_requests_in_flight_across_10_reloads_all_succeed(mock: MockProcess, tmp_path: Path) -> None:
    with SidecarProcess(config(mock.url), tmp_path) as sidecar:
        asyncio.run(_hammer_while_reloading(sidecar, mock.url))


async def _hammer_while_reloading(sidecar: SidecarProcess, mock_url: str) -> None:
    client = AsyncOpenAI(
        base_url=sidecar.base_url,
        api_key="x",
        max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(limits=httpx2.Limits(max_connections=64), timeout=30),
    )
    gate = asyncio.Semaphore(64)
    rng = random.Random(7)
    failures: list[str] = []

    async def one(i: int) -> None:
        stream = i % 2 == 0
        headers = {"x-mock-chunks": "10", "x-mock-delay-ms": str(rng.choice((5, 20, 40)))}
        async with gate:
            try:
                if stream:
                    chunks = await client.chat.completions.create(
                        model="demo-model", messages=MESSAGES, stream=True, extra_headers=headers
                    )
                    n = 0
                    async for chunk in chunks:
                        n += bool(chunk.choices and chunk.choices[0].delta.content)
                    if n != 10:
                        failures.append(f"request {i}: stream of {n} content chunks, not 10")
                else:
                    reply = await client.chat.completions.create(
                        model="demo-model", messages=MESSAGES, extra_headers=headers
                    )
                    if not reply.choices[0].message.content:
                        failures.append(f"request {i}: empty answer")
            except Exception as e:
                failures.append(f"request {i} ({'stream' if stream else 'whole'}): {type(e).__name__}: {e}")

    async def reloads() -> list[str]:
        problems: list[str] = []
        loop = asyncio.get_running_loop()
        for n in range(10):
            await asyncio.sleep(0.3)
            if n == 4:
                ok = await loop.run_in_executor(None, sidecar.reload, "routes: [broken\n")
                if ok:
                    problems.append("the invalid file was accepted")
                continue
            upstream = "mock-a" if n % 2 else "mock-b"  # the route moves: the other pool is retired
            text = config(mock_url, upstream=upstream, extra_route=f"model-{n}")
            if not await loop.run_in_executor(None, sidecar.reload, text):
                problems.append(f"reload {n} rejected")
                continue
            reply = await client.chat.completions.create(model=f"model-{n}", messages=MESSAGES)
            if reply.model != f"model-{n}-v1":
                problems.append(f"reload {n}: its route answered {reply.model}")
        return problems

    reloading = asyncio.ensure_future(reloads())
    await asyncio.gather(*(one(i) for i in range(1000)))
    problems = await reloading
    await client.close()
    assert not failures, f"{len(failures)} of 1000 failed: {failures[:5]}"
    assert not problems, problems
    assert sidecar.logs().count("config reloaded from") == 9
