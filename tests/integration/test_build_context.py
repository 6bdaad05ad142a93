"""BuildContext's seams through the real sidecar: a user's middleware sends copies of requests to a
second upstream (``ctx.sender``: its pool, its api_key, no chain) from background tasks
(``ctx.tasks``), counted on /metrics; an unknown upstream stops the start; SIGTERM drains the tasks
(a quick one finishes, one still running when drain_timeout_s runs out is cancelled and logged)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import REPO_ROOT, SidecarProcess
from tests.integration.test_admin import admin_url, labels, scrape

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def shadow() -> Iterator[MockProcess]:
    with MockProcess() as proc:
        yield proc


def config(
    main: str, shadow: str, *, mirror_type: str = "Mirror", upstream: str = "shadow", extra: str = ""
) -> str:
    return (
        'listen: {address: "127.0.0.1:0"}\n'
        'admin: {address: "127.0.0.1:0"}\n'
        "upstreams:\n"
        f'  main: {{url: "{main}"}}\n'
        f'  shadow: {{url: "{shadow}", api_key: "shadow-key"}}\n'
        "routes:\n"
        "  - {model: demo-model, targets: [{upstream: main, model: mock-model-v1}]}\n"
        "middleware:\n"
        "  - {type: auth, keys: [{id: app, key: client-key}]}\n"
        f'  - {{type: "tests.integration.mirror_middleware:{mirror_type}", upstream: {upstream}}}\n'
        f"{extra}"
    )


def test_a_middleware_sends_a_copy_to_another_upstream_through_its_pool(
    mock: MockProcess, shadow: MockProcess, tmp_path: Path
) -> None:
    mock.reset()
    shadow.reset()
    with SidecarProcess(config(mock.url, shadow.url), tmp_path) as sidecar:
        client = OpenAI(base_url=sidecar.base_url, api_key="client-key", max_retries=0)
        for _ in range(3):
            answer = client.chat.completions.create(model="demo-model", messages=MESSAGES)
            assert answer.model == "mock-model-v1"
        seen = shadow.wait_stats(lambda s: s["answered"] == 3)
        assert seen["by_path"] == {"/v1/chat/completions": 3}
        last = seen["last_request"]
        # The copy is the client's request as sent (model "demo-model": no routing, no rewrite),
        # with the shadow upstream's own key in place of the client's, and the client request's id.
        assert last["json"]["model"] == "demo-model"
        assert last["headers"]["authorization"] == "Bearer shadow-key"
        assert last["headers"]["x-request-id"] in mock.stats()["request_ids"]
        assert mock.stats()["by_path"] == {"/v1/chat/completions": 3}
        sidecar.wait_log("mirror ")
        metrics = scrape(admin_url(sidecar))
        assert metrics[("llm_sidecar_background_tasks_spawned_total", labels(name="mirror"))] == 3
        # The chain's auth guards the client's request only: a refused one is never mirrored.
        with pytest.raises(openai.AuthenticationError):
            OpenAI(base_url=sidecar.base_url, api_key="wrong", max_retries=0).chat.completions.create(
                model="demo-model", messages=MESSAGES
            )
        assert (
            scrape(admin_url(sidecar))[("llm_sidecar_background_tasks_spawned_total", labels(name="mirror"))]
            == 3
        )


def test_an_unknown_upstream_is_a_config_error_with_its_line(mock: MockProcess, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(config(mock.url, mock.url, upstream="shadw"))
    checked = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 2
    assert (
        f"{path}:10: middleware[1].upstream: unknown upstream 'shadw'; known: main, shadow" in checked.stderr
    )


def test_an_unknown_upstream_the_loader_cannot_see_stops_the_build(mock: MockProcess, tmp_path: Path) -> None:
    text = config(mock.url, mock.url, mirror_type="MirrorUnchecked", upstream="shadw")
    sidecar = SidecarProcess(text, tmp_path)
    with pytest.raises(RuntimeError, match="exited with 2"):
        sidecar.start()
    assert (
        "not starting: middleware[1] (tests.integration.mirror_middleware:MirrorUnchecked): "
        "unknown upstream 'shadw'; known: main, shadow"
    ) in sidecar.logs()


def test_sigterm_drains_background_tasks_and_cancels_what_outlasts_the_drain(
    mock: MockProcess, shadow: MockProcess, tmp_path: Path
) -> None:
    shadow.reset()
    text = config(mock.url, shadow.url, extra="drain_timeout_s: 1.5\n")
    with SidecarProcess(text, tmp_path) as sidecar:
        assert sidecar.proc is not None
        client = OpenAI(base_url=sidecar.base_url, api_key="client-key", max_retries=0)
        client.chat.completions.create(
            model="demo-model", messages=MESSAGES, extra_headers={"x-mirror-delay-s": "0.5"}
        )
        client.chat.completions.create(
            model="demo-model", messages=MESSAGES, extra_headers={"x-mirror-delay-s": "60"}
        )
        started = time.monotonic()
        assert sidecar.stop(timeout=10) == 0
        took = time.monotonic() - started
        logs = sidecar.logs()
        assert "waiting up to" in logs and "for 2 background task(s)" in logs
        assert "cancelled 1 background task(s) still running after" in logs and "mirror × 1" in logs
        assert len(re.findall(r"mirror \S+: 200, ", logs)) == 1
        assert len(re.findall(r"mirror \S+: cancelled", logs)) == 1  # it saw the cancel (and could clean up)
        assert shadow.stats()["answered"] == 1  # the quick copy finished during the drain
        assert 1.0 < took < 8  # the drain ran out (about 1.5 s), not the SIGKILL
