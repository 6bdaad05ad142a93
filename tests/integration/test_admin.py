"""The admin listener through the real sidecar: /metrics parsed with prometheus_client's parser
(request counts equal the requests made), /readyz turning 503 when the only upstream's breaker
opens and 200 again after open_s, the bearer token, and a port of its own."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import httpx2
import openai
import pytest
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
ADMIN = 'admin: {address: "127.0.0.1:0"}\n'
_ADMIN_LINE = re.compile(r"admin listener on http://127\.0\.0\.1:(\d+) ")


def admin_url(sidecar: SidecarProcess) -> str:
    deadline = time.monotonic() + 5
    while (match := _ADMIN_LINE.search(sidecar.logs())) is None:
        assert time.monotonic() < deadline, sidecar.logs()
        time.sleep(0.01)
    return f"http://127.0.0.1:{match.group(1)}"


def scrape(
    url: str, headers: dict[str, str] | None = None
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    response = httpx.get(url + "/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def scrape_when(
    url: str, ready: Callable[[dict[tuple[str, tuple[tuple[str, str], ...]], float]], bool]
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A scrape once ``ready`` holds of it: a stream is counted at its end, which the sidecar sees
    a moment after the client read its last event."""
    deadline = time.monotonic() + 5
    while not ready(m := scrape(url)):
        assert time.monotonic() < deadline, m
        time.sleep(0.01)
    return m


def labels(**kv: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kv.items()))


def test_metrics_count_the_requests_made(mock: MockProcess, tmp_path: Path) -> None:
    with SidecarProcess(minimal_config(mock.url, extra=ADMIN), tmp_path) as sidecar:
        url = admin_url(sidecar)
        assert url != sidecar.url  # a port of its own
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        for _ in range(5):
            client.chat.completions.create(model="demo-model", messages=MESSAGES)
        stream = client.chat.completions.create(model="demo-model", messages=MESSAGES, stream=True)
        assert sum(1 for _ in stream) > 0
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=MESSAGES)
        assert httpx.get(sidecar.url + "/healthz").status_code == 200  # answered by the sidecar: not counted

        ok = labels(route="demo-model", upstream="mock", model="mock-model-v1", status="200")
        m = scrape_when(url, lambda m: m.get(("llm_sidecar_requests_total", ok)) == 6)  # the stream's end
        # An unknown model is not a route: counted with its status, under route "" (bounded labels).
        not_found = labels(route="", upstream="", model="", status="404")
        assert m[("llm_sidecar_requests_total", not_found)] == 1
        assert m[("gen_ai_client_operation_duration_seconds_count", ok)] == 6
        assert m[("gen_ai_client_operation_duration_seconds_count", not_found)] == 1
        assert m[("gen_ai_client_operation_duration_seconds_bucket", labels(**dict(ok), le="+Inf"))] == 6
        assert m[("gen_ai_client_operation_duration_seconds_sum", ok)] > 0
        buckets = [
            v
            for (name, ls), v in m.items()
            if name == "gen_ai_client_operation_duration_seconds_bucket" and dict(ls)["status"] == "200"
        ]
        assert len(buckets) == 8  # the default 7 bounds and +Inf
        assert m[("llm_sidecar_requests_in_flight", ())] == 0
        assert m[("llm_sidecar_config_reloads_total", labels(result="ok"))] == 0
        assert m[("llm_sidecar_upstream_connections", labels(upstream="mock", state="idle"))] >= 1
        assert m[("llm_sidecar_upstream_connections", labels(upstream="mock", state="busy"))] == 0
        assert m[("llm_sidecar_upstream_waiting_requests", labels(upstream="mock"))] == 0
        assert m[("llm_sidecar_client_connections", ())] >= 0
        assert not any(name == "llm_sidecar_breaker_state" for name, _ in m)  # no breaker configured

        # A reload is counted, and the counts carry on.
        assert sidecar.reload(minimal_config(mock.url, extra=ADMIN))
        client.chat.completions.create(model="demo-model", messages=MESSAGES)
        m = scrape(url)
        assert m[("llm_sidecar_config_reloads_total", labels(result="ok"))] == 1
        assert m[("llm_sidecar_requests_total", ok)] == 7
        # The proxy's port does not serve the admin paths.
        assert httpx.get(sidecar.url + "/metrics").status_code == 404


def test_readyz_turns_503_when_the_only_breaker_opens_and_back(mock: MockProcess, tmp_path: Path) -> None:
    breaker = "middleware:\n  - {type: circuit_breaker, consecutive_failures: 2, open_s: 2}\n"
    with SidecarProcess(minimal_config(mock.url, extra=ADMIN + breaker), tmp_path) as sidecar:
        url = admin_url(sidecar)
        ready = httpx.get(url + "/readyz")
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        for _ in range(2):
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(
                    model="demo-model", messages=MESSAGES, extra_headers={"x-mock-status": "500"}
                )
        opened = time.monotonic()
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 503
        assert ready.json() == {
            "ready": False,
            "problems": ["route demo-model: no target available (breaker of upstream mock open)"],
        }
        m = scrape(url)
        assert m[("llm_sidecar_breaker_state", labels(upstream="mock"))] == 2
        assert (
            m[
                (
                    "llm_sidecar_requests_total",
                    labels(route="demo-model", upstream="mock", model="mock-model-v1", status="500"),
                )
            ]
            == 2
        )

        while time.monotonic() < opened + 2.5:  # open_s later, the next call would be a probe
            time.sleep(0.1)
        ready = httpx.get(url + "/readyz")
        assert (ready.status_code, ready.json()) == (200, {"ready": True})
        assert scrape(url)[("llm_sidecar_breaker_state", labels(upstream="mock"))] == 1
        client.chat.completions.create(model="demo-model", messages=MESSAGES)  # a probe that succeeds


def test_the_token_guards_all_but_healthz(mock: MockProcess, tmp_path: Path) -> None:
    admin = 'admin: {address: "127.0.0.1:0", token: "${ADMIN_TOKEN}"}\n'
    env = {"ADMIN_TOKEN": "s3cret-admin"}
    with SidecarProcess(minimal_config(mock.url, extra=admin), tmp_path, env=env) as sidecar:
        url = admin_url(sidecar)
        good = {"Authorization": "Bearer s3cret-admin"}
        for path in ("/metrics", "/readyz"):
            assert httpx.get(url + path).status_code == 401
            assert httpx.get(url + path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert httpx.get(url + path, headers=good).status_code == 200
        health = httpx.get(url + "/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert "s3cret-admin" not in sidecar.logs()


def test_admin_off_serves_no_admin_port(mock: MockProcess, tmp_path: Path) -> None:
    config = minimal_config(mock.url, extra="admin: {enabled: false}\n")
    with SidecarProcess(config, tmp_path) as sidecar:
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        client.chat.completions.create(model="demo-model", messages=MESSAGES)
        assert "admin listener" not in sidecar.logs()
        assert httpx.get(sidecar.url + "/healthz").status_code == 200


def test_an_admin_port_taken_leaves_the_proxy_serving(mock: MockProcess, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    with SidecarProcess(minimal_config(mock.url, extra=ADMIN), tmp_path / "a") as first:
        taken = admin_url(first).rsplit(":", 1)[1]
        config = minimal_config(mock.url, extra=f'admin: {{address: "127.0.0.1:{taken}"}}\n')
        (tmp_path / "b").mkdir()
        with SidecarProcess(config, tmp_path / "b") as second:
            client = OpenAI(base_url=second.base_url, api_key="x", max_retries=0)
            client.chat.completions.create(model="demo-model", messages=MESSAGES)
            second.wait_log(f"admin listener: cannot listen on 127.0.0.1:{taken}")


def test_the_admin_address_cannot_be_the_listen_address(mock: MockProcess, tmp_path: Path) -> None:
    config = minimal_config(mock.url, extra='admin: {address: "127.0.0.1:18080"}\n').replace(
        '"127.0.0.1:0"', '"127.0.0.1:18080"', 1
    )
    with pytest.raises(RuntimeError) as info:
        SidecarProcess(config, tmp_path).start()
    assert "admin.address: '127.0.0.1:18080' is where the proxy listens (listen.address)" in str(info.value)


def test_http2_requests_are_counted_alike(mock: MockProcess, tmp_path: Path) -> None:
    with SidecarProcess(minimal_config(mock.url, extra=ADMIN), tmp_path) as sidecar:
        url = admin_url(sidecar)
        http = httpx2.Client(http1=False, http2=True, timeout=10)  # h2c with prior knowledge
        with OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0, http_client=http) as client:
            for _ in range(3):
                client.chat.completions.create(model="demo-model", messages=MESSAGES)
                assert sum(
                    1
                    for _ in client.chat.completions.create(
                        model="demo-model", messages=MESSAGES, stream=True
                    )
                )
            assert http.get(sidecar.url + "/healthz").http_version == "HTTP/2"
            m = scrape(url)
            ok = labels(route="demo-model", upstream="mock", model="mock-model-v1", status="200")
            assert m[("llm_sidecar_requests_total", ok)] == 6
            assert m[("gen_ai_client_operation_duration_seconds_count", ok)] == 6
            assert m[("llm_sidecar_requests_in_flight", ())] == 0
            assert m[("llm_sidecar_client_connections", ())] == 1  # the one HTTP/2 connection, still open


def test_a_stream_is_timed_to_its_end(mock: MockProcess, tmp_path: Path) -> None:
    with SidecarProcess(minimal_config(mock.url, extra=ADMIN), tmp_path) as sidecar:
        url = admin_url(sidecar)
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        slow = {"x-mock-chunks": "4", "x-mock-delay-ms": "100"}  # the head at once, the end ≥ 0.3 s later
        stream = client.chat.completions.create(
            model="demo-model", messages=MESSAGES, stream=True, extra_headers=slow
        )
        assert sum(1 for _ in stream) >= 4
        ok = labels(route="demo-model", upstream="mock", model="mock-model-v1", status="200")
        m = scrape_when(url, lambda m: ("gen_ai_client_operation_duration_seconds_sum", ok) in m)
        assert m[("gen_ai_client_operation_duration_seconds_sum", ok)] >= 0.3
        assert m[("gen_ai_client_operation_duration_seconds_bucket", labels(**dict(ok), le="0.25"))] == 0
        assert m[("gen_ai_client_operation_duration_seconds_bucket", labels(**dict(ok), le="2.5"))] == 1


def test_readyz_says_stopping_while_the_sidecar_drains(mock: MockProcess, tmp_path: Path) -> None:
    with SidecarProcess(minimal_config(mock.url, extra=ADMIN), tmp_path) as sidecar:
        url = admin_url(sidecar)
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        long = {"x-mock-chunks": "20", "x-mock-delay-ms": "100"}  # ~2 s of stream
        stream = client.chat.completions.create(
            model="demo-model", messages=MESSAGES, stream=True, extra_headers=long
        )
        chunks = iter(stream)
        next(chunks)
        assert sidecar.proc is not None
        sidecar.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while "stopping: finishing" not in sidecar.logs():
            assert time.monotonic() < deadline, sidecar.logs()
            time.sleep(0.01)
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 503
        assert ready.json()["problems"] == [
            "stopping: finishing the requests in flight, taking no new connections"
        ]
        assert scrape(url)[("llm_sidecar_requests_in_flight", ())] == 1
        assert sum(1 for _ in chunks) > 0  # the stream still completes
        assert sidecar.proc.wait(10) == 0


def test_a_reload_that_changes_admin_says_it_takes_a_restart(mock: MockProcess, tmp_path: Path) -> None:
    with SidecarProcess(minimal_config(mock.url, extra=ADMIN), tmp_path) as sidecar:
        url = admin_url(sidecar)
        changed = 'admin: {address: "127.0.0.1:0", token: "new"}\n'
        assert sidecar.reload(minimal_config(mock.url, extra=changed))
        sidecar.wait_log("admin: changed, but it takes a restart; still as before")
        assert httpx.get(url + "/metrics").status_code == 200  # no token yet: as before


def test_a_request_refused_by_the_front_is_counted(mock: MockProcess, tmp_path: Path) -> None:
    config = minimal_config(mock.url, extra=ADMIN + "limits: {max_body_bytes: 1000}\n")
    with SidecarProcess(config, tmp_path) as sidecar:
        url = admin_url(sidecar)
        with socket.create_connection((sidecar.host, sidecar.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5000\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 413 ")
        m = scrape(url)
        assert m[("llm_sidecar_requests_refused_total", labels(status="413"))] == 1


def test_readyz_names_what_a_middleware_reports(mock: MockProcess, tmp_path: Path) -> None:
    flag = tmp_path / "not-ready"
    mw = f'middleware:\n  - {{type: "tests.integration.ready_middleware:FlagFile", flag: "{flag}"}}\n'
    with SidecarProcess(minimal_config(mock.url, extra=ADMIN + mw), tmp_path) as sidecar:
        url = admin_url(sidecar)
        assert httpx.get(url + "/readyz").status_code == 200
        flag.write_text("Redis at 127.0.0.1:1 has not answered for 12 s\n")
        ready = httpx.get(url + "/readyz")
        assert ready.status_code == 503
        where = "middleware tests.integration.ready_middleware:FlagFile"
        assert ready.json()["problems"] == [f"{where}: Redis at 127.0.0.1:1 has not answered for 12 s"]
        flag.unlink()
        assert httpx.get(url + "/readyz").status_code == 200


def test_a_route_added_by_a_reload_is_labelled_with_its_name(mock: MockProcess, tmp_path: Path) -> None:
    with SidecarProcess(minimal_config(mock.url, extra=ADMIN), tmp_path) as sidecar:
        url = admin_url(sidecar)
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="added", messages=MESSAGES)
        added = "  - {model: added, targets: [{upstream: mock, model: added-v1}]}\n"
        assert sidecar.reload(minimal_config(mock.url, extra=added + ADMIN))
        client.chat.completions.create(model="added", messages=MESSAGES)
        m = scrape(url)
        assert m[("llm_sidecar_requests_total", labels(route="", upstream="", model="", status="404"))] == 1
        assert (
            m[
                (
                    "llm_sidecar_requests_total",
                    labels(route="added", upstream="mock", model="added-v1", status="200"),
                )
            ]
            == 1
        )


def test_the_admin_port_answers_what_it_does_not_serve_clearly(mock: MockProcess, tmp_path: Path) -> None:
    """Unknown paths 404 and other methods 405, in JSON; HEAD answers like GET without a body;
    oversize headers 431; every answer has a request id (the sidecar's own front serves the port)."""
    with SidecarProcess(minimal_config(mock.url, extra=ADMIN), tmp_path) as sidecar:
        url = admin_url(sidecar)
        missing = httpx.get(url + "/v1/models")
        assert missing.status_code == 404 and "/metrics" in missing.json()["error"]
        post = httpx.post(url + "/metrics", content=b"x")
        assert (post.status_code, post.headers["allow"]) == (405, "GET, HEAD")
        head = httpx.head(url + "/readyz")
        assert (head.status_code, head.content) == (200, b"")
        assert httpx.head(url + "/healthz").status_code == 200
        big = httpx.get(url + "/metrics", headers={"x-big": "a" * 20000})
        assert big.status_code == 431
        for response in (missing, post, head, big):
            assert response.headers["x-request-id"]
        with httpx.Client() as client:  # keep-alive: many scrapes on one connection
            for _ in range(20):
                assert client.get(url + "/metrics").status_code == 200


@pytest.mark.parametrize("access_log", [False, True], ids=["metrics", "metrics-and-access-log"])
def test_tokens_and_stream_timings_match_what_the_client_saw(
    mock: MockProcess, tmp_path: Path, access_log: bool
) -> None:
    """gen_ai_client_token_usage sums equal the usage the mock reported (whole answers and streams
    with include_usage); one time-to-first-token and one time-per-output-token observation per
    stream, none for a whole answer; the overhead histogram counts every request. With the access
    log on too, nothing is counted twice, and the lines carry the same tokens."""
    extra = ADMIN + ("log: {access_log: true, format: json}\n" if access_log else "")
    with SidecarProcess(minimal_config(mock.url, extra=extra), tmp_path) as sidecar:
        url = admin_url(sidecar)
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        prompt = completion = 0
        for _ in range(3):
            answer = client.chat.completions.create(model="demo-model", messages=MESSAGES)
            assert answer.usage is not None
            prompt += answer.usage.prompt_tokens
            completion += answer.usage.completion_tokens
        paced = {"x-mock-chunks": "5", "x-mock-delay-ms": "20"}
        for _ in range(2):
            stream = client.chat.completions.create(
                model="demo-model",
                messages=MESSAGES,
                stream=True,
                stream_options={"include_usage": True},
                extra_headers=paced,
            )
            usage = [c.usage for c in stream if c.usage is not None]
            assert len(usage) == 1
            prompt += usage[0].prompt_tokens
            completion += usage[0].completion_tokens
        overhead = labels(route="demo-model", upstream="mock")
        m = scrape_when(url, lambda m: m.get(("llm_sidecar_overhead_seconds_count", overhead)) == 5)
        target = {"route": "demo-model", "upstream": "mock", "model": "mock-model-v1"}
        tokens = "gen_ai_client_token_usage"
        assert m[(f"{tokens}_sum", labels(**target, gen_ai_token_type="input"))] == prompt
        assert m[(f"{tokens}_sum", labels(**target, gen_ai_token_type="output"))] == completion
        assert m[(f"{tokens}_count", labels(**target, gen_ai_token_type="output"))] == 5
        ttft = m[("gen_ai_server_time_to_first_token_seconds_count", labels(**target))]
        assert ttft == 2
        tpot_count = m[("gen_ai_server_time_per_output_token_seconds_count", labels(**target))]
        tpot_sum = m[("gen_ai_server_time_per_output_token_seconds_sum", labels(**target))]
        assert tpot_count == 2 and 0 < tpot_sum < 1
        if access_log:
            logs = sidecar.wait_log('"tokens_out"')
            lines = [json.loads(x) for x in logs.splitlines() if '"llm_sidecar.access"' in x]
            deadline = time.monotonic() + 5
            while len(lines) < 5 and time.monotonic() < deadline:  # (the log thread writes them)
                time.sleep(0.05)
                lines = [json.loads(x) for x in sidecar.logs().splitlines() if '"llm_sidecar.access"' in x]
            assert sum(line["tokens_in"] for line in lines) == prompt
            assert sum(line["tokens_out"] for line in lines) == completion
        assert m[("llm_sidecar_overhead_seconds_count", overhead)] == 5
        # the sidecar's own time is well under the streams' 5 × 20 ms of upstream pacing
        assert m[("llm_sidecar_overhead_seconds_sum", overhead)] < 0.2


def test_server_timing_splits_the_sidecars_time_from_the_upstreams(mock: MockProcess, tmp_path: Path) -> None:
    config = minimal_config(mock.url, extra="server_timing: true\n")
    with SidecarProcess(config, tmp_path) as sidecar:
        slow = httpx.post(
            sidecar.base_url + "/chat/completions",
            json={"model": "demo-model", "messages": MESSAGES},
            headers={"x-mock-first-byte-ms": "150"},
        )
        assert slow.status_code == 200
        timing = dict(part.strip().split(";dur=") for part in slow.headers["server-timing"].split(","))
        assert float(timing["upstream"]) >= 150 > float(timing["proxy"])
        missing = httpx.post(sidecar.base_url + "/chat/completions", json={"model": "nope"})
        assert missing.status_code == 404
        assert "upstream;dur=0.000" in missing.headers["server-timing"]
    with SidecarProcess(minimal_config(mock.url), tmp_path) as sidecar:  # off by default
        plain = httpx.post(
            sidecar.base_url + "/chat/completions", json={"model": "demo-model", "messages": MESSAGES}
        )
        assert "server-timing" not in plain.headers


def test_middleware_counters_reach_metrics_and_survive_a_reload(mock: MockProcess, tmp_path: Path) -> None:
    """retry's retries and refusals and rate_limit's refusals, by reason, through BuildContext.metrics;
    a reload with the same middleware keeps counting on the same series."""
    chain = (
        "middleware:\n"
        "  - {type: retry, attempts: 2, base_s: 0.001, cap_s: 0.001}\n"
        "  - {type: rate_limit, requests_per_minute: 60, burst: 0.05}  # a bucket of 3\n"
    )
    with SidecarProcess(minimal_config(mock.url, extra=chain + ADMIN), tmp_path) as sidecar:
        url = admin_url(sidecar)
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        failing = {"x-mock-status": "503"}
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="demo-model", messages=MESSAGES, extra_headers=failing)
        client.chat.completions.create(model="demo-model", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            for _ in range(5):
                client.chat.completions.create(model="demo-model", messages=MESSAGES)
        m = scrape(url)
        assert m[("llm_sidecar_retries_total", labels(upstream="mock"))] == 1
        assert m[("llm_sidecar_retry_refusals_total", labels(reason="attempts"))] == 1
        assert m[("llm_sidecar_rate_limit_refusals_total", labels(reason="requests"))] == 1
        assert sidecar.reload(minimal_config(mock.url, extra=chain + ADMIN))
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="demo-model", messages=MESSAGES)
        m = scrape(url)
        assert m[("llm_sidecar_rate_limit_refusals_total", labels(reason="requests"))] == 2
        assert m[("llm_sidecar_retries_total", labels(upstream="mock"))] == 1


def test_a_dead_redis_makes_the_sidecar_unready_and_is_counted(mock: MockProcess, tmp_path: Path) -> None:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = dead.getsockname()[1]
    chain = (
        "middleware:\n"
        "  - type: rate_limit\n"
        "    backend: redis\n"
        f'    redis: {{url: "redis://:hunter2@127.0.0.1:{port}/0", timeout_ms: 200}}\n'
        "    requests_per_minute: 600\n"
    )
    try:
        with SidecarProcess(minimal_config(mock.url, extra=chain + ADMIN), tmp_path) as sidecar:
            url = admin_url(sidecar)
            assert httpx.get(url + "/readyz").status_code == 200  # nothing has failed yet
            client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
            client.chat.completions.create(model="demo-model", messages=MESSAGES)  # allowed unchecked
            ready = httpx.get(url + "/readyz")
            assert ready.status_code == 503
            (problem,) = ready.json()["problems"]
            assert problem.startswith(f"middleware rate_limit: Redis at 127.0.0.1:{port}: the last round")
            assert "hunter2" not in ready.text
            m = scrape(url)
            assert m[("llm_sidecar_redis_failures_total", labels(user="rate_limit"))] >= 1
    finally:
        dead.close()
