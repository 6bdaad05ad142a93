"""SIGTERM drains: streams in flight complete, new connections are refused, exit 0; what is still
running when drain_timeout_s runs out is cut the way a broken stream ends (an SSE error event the
openai SDK raises), on HTTP/1.1 and on h2c."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import openai
import orjson
from hpack import Decoder
from hyperframe.frame import DataFrame, HeadersFrame
from openai import AsyncOpenAI, OpenAI

from tests.integration.h2_raw import RawH2, frames
from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


def test_sigterm_during_100_streams_lets_each_complete_and_exits_0(mock: MockProcess, tmp_path: Path) -> None:
    with SidecarProcess(minimal_config(mock.url), tmp_path) as sidecar:
        assert sidecar.proc is not None
        proc = sidecar.proc

        async def run() -> tuple[list[int], bool]:
            client = AsyncOpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
            headers = {"x-mock-chunks": "20", "x-mock-delay-ms": "50"}  # about 1 s each

            async def one() -> int:
                stream = await client.chat.completions.create(
                    model="demo-model", messages=MESSAGES, stream=True, extra_headers=headers
                )
                return sum([bool(c.choices and c.choices[0].delta.content) async for c in stream])

            tasks = [asyncio.ensure_future(one()) for _ in range(100)]
            while mock.stats()["in_flight"] < 100:  # noqa: ASYNC110 - polls another process
                await asyncio.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:  # new connections are refused once the drain began
                socket.create_connection((sidecar.host, sidecar.port), timeout=1).close()
                refused = False
            except OSError:
                refused = True
            counts = await asyncio.gather(*tasks)
            await client.close()
            return counts, refused

        counts, refused = asyncio.run(run())
        assert counts == [20] * 100
        assert refused
        assert proc.wait(20) == 0
        assert "response(s) cut" not in sidecar.logs()


def test_streams_still_running_when_the_drain_runs_out_end_with_an_error_event(
    mock: MockProcess, tmp_path: Path
) -> None:
    extra = "drain_timeout_s: 0.5\n"
    with SidecarProcess(minimal_config(mock.url, extra=extra), tmp_path) as sidecar:
        assert sidecar.proc is not None
        client = OpenAI(base_url=sidecar.base_url, api_key="x", max_retries=0)
        slow = {"x-mock-chunks": "100", "x-mock-delay-ms": "100"}  # 10 s: outlasts the drain
        stream = client.chat.completions.create(
            model="demo-model", messages=MESSAGES, stream=True, extra_headers=slow
        )
        first = next(iter(stream))
        assert first.choices
        h2 = RawH2(sidecar.host, sidecar.port, timeout=5)
        body = orjson.dumps({"model": "demo-model", "messages": MESSAGES, "stream": True})
        sid = h2.request("POST", "/v1/chat/completions", body, slow)
        h2.wait(lambda: sid in h2.bodies)  # its first event came
        waiting = h2.request(  # still in the chain when the drain runs out: answered 503
            "POST", "/v1/chat/completions", orjson.dumps({"model": "demo-model", "messages": MESSAGES}),
            {"x-mock-first-byte-ms": "10000"},
        )  # fmt: skip
        time.sleep(0.2)
        started = time.monotonic()
        sidecar.proc.send_signal(signal.SIGTERM)
        try:
            for _ in stream:
                pass
            raise AssertionError("the cut HTTP/1.1 stream ended without an error")
        except openai.APIError as e:
            assert "drain_timeout_s" in str(e), e
        assert time.monotonic() - started < 5
        # After the GOAWAY, frames are read raw: h2 (the client here) drops a connection's
        # frames once it has a GOAWAY, while the streams below its last id go on.
        bodies: dict[int, bytearray] = {sid: bytearray(h2.bodies[sid]), waiting: bytearray()}
        ended: set[int] = set()
        statuses: dict[int, int] = {}
        decoder = Decoder()  # the sidecar's HPACK encoder uses no dynamic table
        for frame in frames(h2.sock, timeout=5):
            if isinstance(frame, HeadersFrame):
                statuses[frame.stream_id] = int(dict(decoder.decode(frame.data, raw=True))[b":status"])
            if isinstance(frame, DataFrame) and frame.stream_id in bodies:
                bodies[frame.stream_id] += frame.data
            if isinstance(frame, DataFrame | HeadersFrame) and "END_STREAM" in frame.flags:
                ended.add(frame.stream_id)
            if ended >= {sid, waiting}:
                break
        assert ended >= {sid, waiting}, (ended, bytes(bodies[sid][-300:]))
        last_event = bytes(bodies[sid]).rsplit(b"data: ", 1)[1]
        assert orjson.loads(last_event)["error"]["code"] == "shutting_down", last_event
        assert statuses[waiting] == 503
        assert orjson.loads(bytes(bodies[waiting]))["error"]["code"] == "shutting_down"
        h2.close()
        assert sidecar.proc.wait(10) == 0
        sidecar.wait_log("drain_timeout_s (0.5 s) ran out: 3 response(s) cut")
