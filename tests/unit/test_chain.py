"""proxy.chain.compose: middleware loaded from YAML run in order, each called as ``(request, next)``."""

from __future__ import annotations

import random

import pytest

from proxy.chain import compose
from proxy.clock import FakeClock
from proxy.config_loader import ConfigError, load_config_text
from proxy.http import Headers, Request, RequestContext, Response
from proxy.registry import BuildContext

MINIMAL = """\
upstreams:
  mock: {url: "http://127.0.0.1:8001"}
routes:
  - model: demo-model
    targets: [{upstream: mock, model: m}]
"""


def request() -> Request:
    ctx = RequestContext(b"rid", "127.0.0.1:1", 0.0)
    return Request("POST", b"/v1/chat/completions", Headers(), b"{}", ctx)


async def terminal(request: Request) -> Response:
    return Response(200, Headers(), b"ok")


async def test_a_user_middleware_with_other_parameter_names_serves() -> None:
    text = MINIMAL + (
        "middleware:\n"
        '  - {type: "tests.unit.sample_middleware:OtherNames"}\n'
        '  - {type: "tests.unit.sample_middleware:Sample", header: x-sample}\n'
    )
    config = load_config_text(text, "config.yaml", {})
    context = BuildContext(FakeClock(), random.Random(1), ("demo-model",))
    handler = compose([entry.factory(entry.config, context) for entry in config.middleware], terminal)
    response = await handler(request())
    assert (response.status, response.body) == (200, b"ok")
    # Sample (second) adds its header first, on the way back out; OtherNames (first) then its own.
    assert response.headers == [(b"x-sample", b"1"), (b"x-other-names", b"1")]


async def test_an_empty_chain_is_the_terminal() -> None:
    assert compose([], terminal) is terminal
    assert (await compose([], terminal)(request())).body == b"ok"


@pytest.mark.parametrize("cls", ["TakesOnlyTheRequest", "NextByKeywordOnly"])
def test_a_middleware_that_cannot_take_request_and_next_is_refused_at_load(cls: str) -> None:
    text = MINIMAL + f'middleware:\n  - {{type: "tests.unit.sample_middleware:{cls}"}}\n'
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "config.yaml", {})
    [problem] = info.value.problems
    assert problem.startswith(
        f"config.yaml:7: middleware[0].type: tests.unit.sample_middleware:{cls}.__call__"
    )
    assert "must take (request, next) as its two positional parameters" in problem
