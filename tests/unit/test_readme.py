"""The README stays true: its config reference names every key, its middleware example works."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from proxy.chain import compose
from proxy.config import (
    Config,
    Http2Config,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    RouteConfig,
    TargetConfig,
    TlsConfig,
    UpstreamConfig,
)
from proxy.http import Headers, Request, RequestContext, Response

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_the_two_set_up_commands_open_the_readme() -> None:
    first_block = README.split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "run"], ["make", "test"]]


def test_the_configuration_reference_names_every_key() -> None:
    reference = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    missing = []
    classes = (Config, ListenConfig, TlsConfig, LimitsConfig, Http2Config, UpstreamConfig, RouteConfig)
    for cls in (*classes, TargetConfig, LogConfig):
        for f in dataclasses.fields(cls):
            named = re.search(rf"[`{{ ]{f.name}[`.\[:,}}]", reference)
            if f.name != "source" and not named:
                missing.append(f"{cls.__name__}.{f.name}")
    assert not missing, f"README's configuration reference does not mention {missing}"


async def test_the_middleware_example_runs() -> None:
    section = README.split("### Writing a middleware", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert code is not None
    namespace: dict[str, object] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    tag_cls, config_cls = namespace["Tag"], namespace["TagConfig"]
    tag = tag_cls(config_cls(header="X-Trace"), None)  # type: ignore[operator]

    async def terminal(request: Request) -> Response:
        return Response(200, Headers(), b"{}")

    handler = compose([tag], terminal)
    request = Request("POST", b"/v1/x", Headers(), b"", RequestContext(b"rid-7", "client", 0.0))
    response = await handler(request)
    assert response.headers.get(b"x-trace") == b"rid-7"
