"""HTTP/2 upstreams, end to end: the real sidecar subprocess in front of the real mock backend
serving h2c (``--h2c``), the openai SDK as client over HTTP/1.1 and over h2c; a scripted h2
upstream (tests/integration/h2_script.py) for GOAWAY, REFUSED_STREAM and a PING left unanswered;
another sidecar serving TLS as the upstream of ``protocol: auto``.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from h2.errors import ErrorCodes
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.integration.h2_raw import Closed, RawH2
from tests.integration.h2_script import ScriptedConn, ScriptedH2
from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config
from tests.tls_cert import self_signed

GREETING = "Hello, this is the mock backend."
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
CHAT = {"model": "demo-model", "messages": HI}


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProcess]:
    with MockProcess(args=["--h2c"]) as proc:
        yield proc


@pytest.fixture(scope="module")
def sidecar(mock: MockProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """Default timeouts: a short one here would also cut the 1000-stream test's slowest heads."""
    config = minimal_config(mock.url, upstream_extra=", protocol: h2c")
    with SidecarProcess(config, tmp_path_factory.mktemp("h2up")) as proc:
        yield proc


@pytest.fixture(autouse=True)
def _fresh_mock(mock: MockProcess) -> None:
    mock.reset()


def sdk(sidecar: SidecarProcess, over: str) -> OpenAI:
    http_client: Any = httpx.Client(http1=over == "http1", http2=over == "h2c", timeout=10)
    return OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0, http_client=http_client)


# ---- the openai SDK through an h2c upstream ---------------------------------------------------


@pytest.mark.parametrize("over", ["http1", "h2c"])
def test_chat_stream_embeddings(sidecar: SidecarProcess, mock: MockProcess, over: str) -> None:
    client = sdk(sidecar, over)
    reply = client.chat.completions.create(model="demo-model", messages=HI)
    assert reply.choices[0].message.content == GREETING
    stream = client.chat.completions.create(model="demo-model", messages=HI, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == GREETING
    embedding = client.embeddings.create(model="demo-model", input=["a", "b"])
    assert len(embedding.data) == 2
    stats = mock.stats()
    assert stats["completed"] == 3
    assert stats["h2_connections"] <= 1  # all on the one multiplexed connection (kept from before)
    headers = stats["last_request"]["headers"]
    assert headers["x-request-id"]  # forwarded
    assert "connection" not in headers and "host" not in headers  # HTTP/2: :authority instead
    assert stats["last_request"]["json"]["model"] == "mock-model-v1"


def status(code: int) -> dict[str, str]:
    return {"x-mock-status": str(code)}


def test_upstream_errors_pass_through(sidecar: SidecarProcess) -> None:
    client = sdk(sidecar, "http1")
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="demo-model", messages=HI, extra_headers=status(429))
    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="demo-model", messages=HI, extra_headers=status(500))
    assert e.value.status_code == 500


def test_first_byte_timeout_is_504_and_resets_the_stream(mock: MockProcess, tmp_path: Path) -> None:
    config = minimal_config(mock.url, upstream_extra=", protocol: h2c, first_byte_timeout_s: 1")
    with SidecarProcess(config, tmp_path) as sidecar:
        with pytest.raises(openai.APIStatusError) as e:
            sdk(sidecar, "h2c").chat.completions.create(
                model="demo-model", messages=HI, extra_headers={"x-mock-first-byte-ms": "3000"}
            )
        assert e.value.status_code == 504
        mock.wait_stats(lambda s: s["disconnects"] == 1)  # RST_STREAM CANCEL reached the mock


def test_dead_upstream_is_502(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    config = minimal_config(f"http://127.0.0.1:{port}", upstream_extra=", protocol: h2c")
    with SidecarProcess(config, tmp_path) as sidecar, pytest.raises(openai.APIStatusError) as e:
        sdk(sidecar, "http1").chat.completions.create(model="demo-model", messages=HI)
    assert e.value.status_code == 502
    assert e.value.code == "upstream_connect_error"


def test_client_disconnect_cancels_the_upstream_stream_at_once(
    sidecar: SidecarProcess, mock: MockProcess
) -> None:
    client = sdk(sidecar, "http1")
    stream = client.chat.completions.create(
        model="demo-model", messages=HI, stream=True, extra_headers={"x-mock-stall-after": "2"}
    )
    next(iter(stream))
    closed_at = time.monotonic()
    stream.close()
    stats = mock.wait_stats(lambda s: s["disconnects"] == 1)
    assert stats["disconnect_times"][-1] - closed_at < 0.1


async def test_client_gone_before_the_head_cancels_the_upstream_stream(
    sidecar: SidecarProcess, mock: MockProcess
) -> None:
    async with httpx.AsyncClient(timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                f"{sidecar.base_url}/chat/completions", json=CHAT, headers={"x-mock-first-byte-ms": "900"}
            )
    left_at = time.monotonic()
    stats = await asyncio.to_thread(mock.wait_stats, lambda s: s["disconnects"] == 1)
    assert stats["disconnect_times"][-1] - left_at < 0.1


@dataclass(frozen=True)
class StreamAnswer:
    """What one client stream got: its status and body, and how it failed if it did."""

    conn: int  # the client connection (0-9)
    sid: int
    status: int | None  # None: no response head came
    body: bytes
    error: BaseException | None = None  # reset, timed out, or the connection closed
    reset: int | None = None  # the RST_STREAM error code, when the sidecar reset the stream

    @property
    def ok(self) -> bool:
        return self.error is None and self.status == 200 and self.body.rstrip().endswith(b"data: [DONE]")

    @property
    def kind(self) -> str:
        when = "before a response head" if self.status is None else f"after status {self.status}"
        if self.reset is not None:
            return f"reset {_error_code(self.reset)} {when}"
        if self.error is not None:
            return f"{type(self.error).__name__} {when}"
        if self.status != 200:
            return f"status {self.status}"
        return "status 200 without data: [DONE]"

    def __str__(self) -> str:
        what = self.kind if self.error is None else f"{self.kind}: {self.error!r}"
        tail = self.body[-240:]
        return f"connection {self.conn} stream {self.sid}: {what}; {len(self.body)} bytes, ending {tail!r}"


def _error_code(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)


def stream_answers(client: RawH2, conn: int, sids: list[int], within: float) -> list[StreamAnswer]:
    """Each stream's answer; one that was reset, timed out or lost its connection says so. All of
    them within ``within`` seconds (a stalled connection does not make each stream wait anew)."""
    deadline = time.monotonic() + within
    answers = []
    for sid in sids:
        try:
            status, _, body = client.response(sid, timeout=max(deadline - time.monotonic(), 0.001))
        except (AssertionError, TimeoutError, Closed, OSError) as e:
            got = bytes(client.bodies.get(sid, b""))
            answers.append(StreamAnswer(conn, sid, client.status.get(sid), got, e, client.resets.get(sid)))
            continue
        answers.append(StreamAnswer(conn, sid, status, body))
    return answers


def failures_report(answers: list[StreamAnswer], show: int = 5) -> str:
    """How many streams failed in each way, on which client connections, and the first few."""
    bad = [a for a in answers if not a.ok]
    kinds = Counter(a.kind for a in bad)
    per_conn = Counter(a.conn for a in bad)
    lines = [f"{len(bad)} of {len(answers)} streams failed: {dict(kinds.most_common())}"]
    lines.append(f"  failed streams per client connection: {dict(sorted(per_conn.items()))}")
    lines += [f"  {a}" for a in bad[:show]]
    return "\n".join(lines)


def test_1000_concurrent_streams_share_at_most_10_upstream_connections(
    sidecar: SidecarProcess, mock: MockProcess
) -> None:
    """10 client connections × 100 concurrent streaming requests, all in flight at once (each
    stream lasts ~1.2 s at the mock): the sidecar carries them on at most 10 upstream connections.

    The burst's last streams wait for the sidecar's and the mock's CPU: on 2 busy cores their
    response heads took over 1 s (a 504 under a first_byte_timeout_s of 1), hence the default here.
    """
    payload = orjson.dumps({**CHAT, "stream": True})
    knobs = {"x-mock-chunks": "8", "x-mock-delay-ms": "150"}

    def one_connection(i: int) -> list[StreamAnswer]:
        with RawH2(sidecar.host, sidecar.port, timeout=30) as client:
            sids = [client.request("POST", "/v1/chat/completions", payload, knobs) for _ in range(100)]
            return stream_answers(client, i, sids, within=30)

    peak = 0
    with ThreadPoolExecutor(max_workers=10) as pool:
        batches = [pool.submit(one_connection, i) for i in range(10)]
        while not all(b.done() for b in batches):  # how many the mock holds at once
            peak = max(peak, mock.stats()["in_flight"])
            time.sleep(0.02)
        answers = [a for b in batches for a in b.result()]
    assert len(answers) == 1000
    assert all(a.ok for a in answers), failures_report(answers)
    assert peak >= 500, peak  # concurrent indeed, on at most 10 upstream connections
    stats = mock.stats()
    assert stats["completed"] == 1000
    assert stats["h2_max_open_connections"] <= 10, stats
    assert stats["h2_connections"] <= 10, stats


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_slow_client_keeps_memory_bounded_and_the_stream_resumes(
    sidecar: SidecarProcess, mock: MockProcess
) -> None:
    assert sidecar.proc is not None
    chunks, size = 128, 256 * 1024  # a 32 MiB stream
    request = orjson.dumps({**CHAT, "stream": True})
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"x-mock-chunks: {chunks}\r\nx-mock-content-bytes: {size}\r\n"
        f"content-length: {len(request)}\r\nconnection: close\r\n\r\n"
    ).encode()
    before = _rss_kib(sidecar.proc.pid)
    with socket.create_connection((sidecar.host, sidecar.port)) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(head + request)
        time.sleep(1.0)  # read nothing: the sidecar must stop the upstream stream, not buffer it
        grown = _rss_kib(sidecar.proc.pid) - before
        total = 0
        sock.settimeout(10)
        while data := sock.recv(1 << 20):
            total += len(data)
    assert grown < 12 * 1024, f"sidecar grew by {grown} KiB for a stalled 32 MiB stream"
    assert total > chunks * size  # the whole stream came through once the client read it
    assert mock.stats()["completed"] == 1


# ---- GOAWAY, REFUSED_STREAM, PING, idle: a scripted upstream --------------------------------------


def scripted_config(url: str, extra: str = "") -> str:
    return minimal_config(url, upstream_extra=", protocol: h2c" + extra)


async def post_all(sidecar: SidecarProcess, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=5) as client:
        url = f"{sidecar.base_url}/chat/completions"
        return list(await asyncio.gather(*(client.post(url, json=CHAT) for _ in range(n))))


async def test_goaway_lets_earlier_streams_finish_and_retries_later_ones(tmp_path: Path) -> None:
    def handler(conn: ScriptedConn, sid: int, headers: dict[bytes, bytes], body: bytes) -> None:
        if conn.index > 0:
            conn.respond(sid, {"conn": conn.index, "sid": sid})
        elif len(conn.seen) == 2:  # both requests are in: the lower one is kept, the other never ran
            first = min(conn.seen)
            conn.goaway(last_stream_id=first)
            conn.respond(first, {"conn": 0, "sid": first})

    async with ScriptedH2(handler) as upstream:
        with SidecarProcess(scripted_config(upstream.url), tmp_path) as sidecar:
            responses = await post_all(sidecar, 2)
            assert [r.status_code for r in responses] == [200, 200]
            assert sorted(r.json()["conn"] for r in responses) == [0, 1]
            await asyncio.wait_for(upstream.conns[0].lost.wait(), 2)  # closed once its stream is done
            assert len(upstream.conns) == 2
            more = await post_all(sidecar, 1)  # new streams go to the new connection
            assert more[0].json()["conn"] == 1


async def test_refused_stream_is_retried_and_bounded(tmp_path: Path) -> None:
    refuse_all = False

    def handler(conn: ScriptedConn, sid: int, headers: dict[bytes, bytes], body: bytes) -> None:
        if refuse_all or sid == 1:
            conn.refuse(sid)
        else:
            conn.respond(sid, {"sid": sid})

    async with ScriptedH2(handler) as upstream:
        with SidecarProcess(scripted_config(upstream.url), tmp_path) as sidecar:
            (response,) = await post_all(sidecar, 1)
            assert response.status_code == 200 and response.json() == {"sid": 3}
            refuse_all = True
            (refused,) = await post_all(sidecar, 1)
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "upstream_unavailable"
            assert len(upstream.conns[0].seen) == 2 + 3  # tried three times, no more


async def test_unanswered_ping_closes_the_connection_and_the_request_goes_elsewhere(tmp_path: Path) -> None:
    def handler(conn: ScriptedConn, sid: int, headers: dict[bytes, bytes], body: bytes) -> None:
        conn.respond(sid, {"conn": conn.index})
        if conn.index == 0:
            conn.frozen = True  # from now on it reads nothing and answers nothing, PINGs included

    extra = ", h2_ping_interval_s: 0.2, h2_ping_timeout_s: 0.3, idle_timeout_s: 30"
    async with ScriptedH2(handler) as upstream:
        with SidecarProcess(scripted_config(upstream.url, extra), tmp_path) as sidecar:
            (first,) = await post_all(sidecar, 1)
            assert first.json() == {"conn": 0}
            await asyncio.sleep(0.3)
            (second,) = await post_all(sidecar, 1)
            assert second.status_code == 200 and second.json() == {"conn": 1}
            await asyncio.wait_for(upstream.conns[0].lost.wait(), 2)


async def test_idle_connection_is_closed_after_idle_timeout(tmp_path: Path) -> None:
    def handler(conn: ScriptedConn, sid: int, headers: dict[bytes, bytes], body: bytes) -> None:
        conn.respond(sid, {"conn": conn.index})

    async with ScriptedH2(handler) as upstream:
        with SidecarProcess(scripted_config(upstream.url, ", idle_timeout_s: 0.3"), tmp_path) as sidecar:
            await post_all(sidecar, 3)
            assert len(upstream.conns) == 1
            await asyncio.wait_for(upstream.conns[0].lost.wait(), 3)
            (again,) = await post_all(sidecar, 1)
            assert again.status_code == 200 and len(upstream.conns) == 2


# ---- protocol: auto (ALPN) and h2 over TLS ----------------------------------------------------------


@pytest.fixture(scope="module")
def tls_upstreams(mock: MockProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two sidecars serving TLS in front of the mock: one offering h2 in ALPN, one only http/1.1."""
    workdir = tmp_path_factory.mktemp("tls-up")
    cert, key = self_signed(workdir)
    listen = f'listen: {{address: "127.0.0.1:0", tls: {{cert: "{cert}", key: "{key}"}}}}\n'
    base = minimal_config(mock.url).replace('listen: {address: "127.0.0.1:0"}\n', listen)
    base = base.replace("- model: demo-model", "- model: mock-model-v1")  # what the front sidecar sends
    (workdir / "h2").mkdir()
    (workdir / "h1").mkdir()
    with (
        SidecarProcess(base, workdir / "h2") as h2,
        SidecarProcess(base + "http2: {enabled: false}\n", workdir / "h1") as h1,
    ):
        yield {"cert": cert, "h2": h2, "h1": h1}


@pytest.mark.parametrize(("server", "protocol", "chosen"), [("h2", "auto", "h2"), ("h1", "auto", "http1"),
                                                            ("h2", "h2", None)])  # fmt: skip
async def test_tls_upstream_alpn(
    tls_upstreams: dict[str, Any], tmp_path: Path, server: str, protocol: str, chosen: str | None
) -> None:
    upstream: SidecarProcess = tls_upstreams[server]
    url = f"https://127.0.0.1:{upstream.port}"
    config = minimal_config(url, upstream_extra=f", protocol: {protocol}")
    env = {"SSL_CERT_FILE": str(tls_upstreams["cert"])}  # trust the self-signed upstream
    with SidecarProcess(config, tmp_path, env=env) as sidecar:
        client = AsyncOpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        for _ in range(2):
            reply = await client.chat.completions.create(model="demo-model", messages=HI)
            assert reply.choices[0].message.content == GREETING
        stream = await client.chat.completions.create(model="demo-model", messages=HI, stream=True)
        assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == GREETING
        await client.close()
        if chosen is not None:
            sidecar.wait_log(f"upstream mock: ALPN chose {chosen}")


async def test_h2_upstream_that_declines_h2_in_alpn_is_502(
    tls_upstreams: dict[str, Any], tmp_path: Path
) -> None:
    url = f"https://127.0.0.1:{tls_upstreams['h1'].port}"
    config = minimal_config(url, upstream_extra=", protocol: h2")
    with SidecarProcess(config, tmp_path, env={"SSL_CERT_FILE": str(tls_upstreams["cert"])}) as sidecar:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.post(f"{sidecar.base_url}/chat/completions", json=CHAT)
    assert response.status_code == 502
    assert "ALPN" in response.json()["error"]["message"]
