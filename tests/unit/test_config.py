"""proxy.config_loader: every problem is reported as ``file:line: dotted.path: message``, all at once."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from proxy import registry
from proxy.config import Config, LimitsConfig, ListenConfig, LogConfig, MiddlewareEntry
from proxy.config_loader import ConfigError, load_config, load_config_text
from tests.unit.sample_middleware import Sample, SampleConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

# Seven lines; tests append to it, so their own lines start at 8.
MINIMAL = """\
listen: {address: "127.0.0.1:8080"}
upstreams:
  mock: {url: "http://127.0.0.1:8001"}
routes:
  - model: demo-model
    targets:
      - {upstream: mock, model: mock-model-v1, weight: 100}
"""
WITHOUT_LISTEN = MINIMAL.split("\n", 1)[1]
SAMPLE = "tests.unit.sample_middleware:Sample"


def load(text: str, env: Mapping[str, str] | None = None) -> Config:
    return load_config_text(textwrap.dedent(text), "config.yaml", {} if env is None else env)


def problems(text: str, env: Mapping[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text, env)
    return info.value.problems


# -- loading ------------------------------------------------------------------------------------


def test_minimal_config_loads_with_values_and_defaults() -> None:
    config = load(MINIMAL)
    assert config.source == "config.yaml"
    assert config.listen == ListenConfig(address="127.0.0.1:8080")
    assert (config.listen.host, config.listen.port) == ("127.0.0.1", 8080)
    assert list(config.upstreams) == ["mock"]
    mock = config.upstreams["mock"]
    assert (mock.url, mock.api_key, mock.max_connections, mock.connect_timeout_s) == (
        "http://127.0.0.1:8001",
        "",
        128,
        5.0,
    )
    [route] = config.routes
    assert route.model == "demo-model"
    [target] = route.targets
    assert (target.upstream, target.model, target.weight) == ("mock", "mock-model-v1", 100.0)
    assert isinstance(target.weight, float)
    assert config.limits == LimitsConfig()
    assert config.log == LogConfig(level="info", access_log=False)
    assert config.middleware == ()
    assert config.default_upstream is None
    assert config.fallback_upstream == "mock"


def test_repo_config_yaml_loads() -> None:
    config = load_config(str(REPO_ROOT / "config.yaml"), env={})
    assert config.routes[0].model == "demo-model"
    assert config.upstreams["mock"].url == "http://127.0.0.1:8001"


def test_load_config_reads_a_file_and_records_its_path(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.yaml"
    path.write_text(MINIMAL + "log: {level: debug, access_log: true}\n")
    config = load_config(str(path), env={})
    assert config.source == str(path)
    assert config.log == LogConfig(level="debug", access_log=True)


def test_load_config_missing_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("config.yaml")
    assert info.value.problems == ["config.yaml: cannot read: No such file or directory"]
    assert str(info.value) == "config.yaml: cannot read: No such file or directory"


def test_yaml_syntax_error() -> None:
    text = """\
    upstreams:
      mock: {url: "http://127.0.0.1:8001"
    routes: []
    """
    assert problems(text) == [
        "config.yaml:3: YAML syntax error: expected ',' or '}', but got '<scalar>'"
        " (while parsing a flow mapping at line 2)"
    ]


def test_yaml_syntax_error_hints_at_quoting_interpolation_in_flow_style() -> None:
    assert problems(MINIMAL + "limits: {max_body_bytes: ${MAX_BODY:-1024}}\n") == [
        "config.yaml:8: YAML syntax error: expected ',' or '}', but got '{'"
        ' (inside {...} or [...], quote a value that uses ${VAR}: "${VAR}")'
    ]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "config.yaml:1: the file is empty; it needs at least 'upstreams:' and 'routes:'"),
        (
            "# only a comment\n",
            "config.yaml:1: the file is empty; it needs at least 'upstreams:' and 'routes:'",
        ),
        ("- listen\n- routes\n", "config.yaml:1: the top level must be a mapping of settings, got a list"),
        ("just text\n", "config.yaml:1: the top level must be a mapping of settings, got 'just text'"),
    ],
)
def test_empty_file_or_top_level_not_a_mapping(text: str, problem: str) -> None:
    assert problems(text) == [problem]


# -- structure: required, unknown and duplicate keys ----------------------------------------------


def test_required_keys() -> None:
    text = """\
    listen: {address: "127.0.0.1:8080"}
    routes:
      - model: demo-model
        targets:
          - {model: mock-model-v1}
    """
    assert problems(text) == [
        "config.yaml:1: upstreams: required",
        "config.yaml:5: routes[0].targets[0].upstream: required",
    ]


def test_unknown_key_with_a_suggestion() -> None:
    text = """\
    upstreams:
      mock:
        url: "http://127.0.0.1:8001"
        max_conections: 10
    routes:
      - {model: demo-model, targets: [{upstream: mock, model: m}]}
    """
    assert problems(text) == [
        "config.yaml:4: upstreams.mock.max_conections: unknown key 'max_conections'"
        " (did you mean 'max_connections'?)"
    ]


def test_unknown_key_lists_the_known_ones() -> None:
    assert problems(MINIMAL + "log:\n  colour: true\n") == [
        "config.yaml:9: log.colour: unknown key 'colour' (known: level, access_log, format, bodies)"
    ]


def test_source_cannot_be_set_from_yaml() -> None:
    assert problems(MINIMAL + "source: elsewhere.yaml\n") == [
        "config.yaml:8: source: unknown key 'source' (known: upstreams, routes, listen, limits,"
        " http2, default_upstream, middleware, log, admin, drain_timeout_s, server_timing)"
    ]


def test_duplicate_key() -> None:
    text = """\
    upstreams:
      mock: {url: "http://127.0.0.1:8001"}
      mock: {url: "http://127.0.0.1:8002"}
    routes:
      - {model: demo-model, targets: [{upstream: mock, model: m}]}
    """
    assert problems(text) == ["config.yaml:3: upstreams.mock: duplicate key (first at line 2)"]


def test_merge_keys_share_settings_and_may_override() -> None:
    config = load(
        """\
        upstreams:
          a: &pool {url: "http://127.0.0.1:8001", max_pending: 3, connect_timeout_s: 1}
          b: {<<: *pool, url: "http://127.0.0.1:8002"}
        routes:
          - {model: demo-model, targets: [{upstream: a, model: m}, {upstream: b, model: m}]}
        """
    )
    b = config.upstreams["b"]
    assert (b.url, b.max_pending, b.connect_timeout_s) == ("http://127.0.0.1:8002", 3, 1.0)


# -- types --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("limits: {max_pipelined: abc}", "limits.max_pipelined: must be an integer, got 'abc'"),
        ("limits: {max_pipelined: true}", "limits.max_pipelined: must be an integer, got 'true'"),
        ("limits: {max_pipelined: 2.5}", "limits.max_pipelined: must be an integer, got '2.5'"),
        ("limits: {max_pipelined: }", "limits.max_pipelined: must be an integer, got null"),
        ("limits: {header_timeout_s: soon}", "limits.header_timeout_s: must be a number, got 'soon'"),
        ("limits: {header_timeout_s: false}", "limits.header_timeout_s: must be a number, got 'false'"),
        ("limits: {header_timeout_s: [1]}", "limits.header_timeout_s: must be a number, got a list"),
        ("log: {access_log: 1}", "log.access_log: must be true or false, got '1'"),
        ("log: {access_log: 'maybe'}", "log.access_log: must be true or false, got 'maybe'"),
        ("listen: {address: {host: localhost}}", "listen.address: must be a string, got a mapping"),
        ("listen: {address: null}", "listen.address: must be a string, got null"),
        ("listen: 8080", "listen: must be a mapping"),
        ("log: [debug]", "log: must be a mapping"),
        ("default_upstream: [mock]", "default_upstream: must be a string, got a list"),
        ("log: {level: verbose}", "log.level: must be one of: debug, info, warning, error"),
    ],
)
def test_wrong_types(extra: str, problem: str) -> None:
    assert problems(extra + "\n" + WITHOUT_LISTEN) == [f"config.yaml:1: {problem}"]


def test_must_be_a_list_and_must_be_a_mapping() -> None:
    text = """\
    upstreams: "http://127.0.0.1:8001"
    routes:
      model: demo-model
    """
    assert problems(text) == [
        "config.yaml:1: upstreams: must be a mapping",
        "config.yaml:2: routes: must be a list",
    ]


def test_lenient_scalars() -> None:
    config = load(
        MINIMAL
        + textwrap.dedent(
            """\
        limits: {max_pipelined: 4.0, header_timeout_s: 3, max_body_bytes: "1_000"}
        log: {level: "warning", access_log: yes}
        default_upstream: null
        """
        )
    )
    assert (config.limits.max_pipelined, config.limits.header_timeout_s) == (4, 3.0)
    assert isinstance(config.limits.header_timeout_s, float)
    assert config.limits.max_body_bytes == 1000
    assert config.log == LogConfig(level="warning", access_log=True)
    assert config.default_upstream is None


def test_numbers_where_a_string_is_expected_keep_their_text() -> None:
    text = """\
    upstreams:
      mock: {url: "http://127.0.0.1:8001", api_key: 0123}
    routes:
      - model: 3.10
        targets: [{upstream: mock, model: 2024}]
    """
    config = load(text)
    assert config.upstreams["mock"].api_key == "0123"
    assert config.routes[0].model == "3.10"
    assert config.routes[0].targets[0].model == "2024"


# -- bounds ---------------------------------------------------------------------------------------


def test_bounds() -> None:
    text = """\
    listen: {address: "127.0.0.1:8080", backlog: 0}
    limits:
      max_header_bytes: 100
      header_timeout_s: 0
    upstreams:
      mock: {url: "http://127.0.0.1:8001", max_pending: -1}
    routes:
      - model: demo-model
        targets:
          - {upstream: mock, model: mock-model-v1, weight: 100}
          - {upstream: mock, model: mock-model-v2, weight: -5}
    """
    assert problems(text) == [
        "config.yaml:1: listen.backlog: must be an integer ≥ 1",
        "config.yaml:3: limits.max_header_bytes: must be an integer ≥ 256",
        "config.yaml:4: limits.header_timeout_s: must be a number ≥ 0.001",
        "config.yaml:6: upstreams.mock.max_pending: must be an integer ≥ 0",
        "config.yaml:11: routes[0].targets[1].weight: must be a number ≥ 0",
    ]


def test_upper_bound() -> None:
    text = MINIMAL + f'middleware:\n  - {{type: "{SAMPLE}", header: x-sample, ratio: 1.5}}\n'
    assert problems(text) == ["config.yaml:9: middleware[0].ratio: must be a number ≤ 1"]


def test_must_not_be_empty() -> None:
    text = """\
    upstreams: {}
    routes:
      - model: ""
        targets: []
    """
    assert problems(text) == [
        "config.yaml:1: upstreams: must not be empty",
        "config.yaml:3: routes[0].model: must not be empty",
        "config.yaml:4: routes[0].targets: must not be empty",
    ]


# -- ${VAR} interpolation ---------------------------------------------------------------------------

INTERPOLATED = """\
listen:
  address: ${HOST:-127.0.0.1}:${PORT:-8080}
  backlog: ${BACKLOG:-512}
upstreams:
  mock:
    url: "http://${MOCK_HOST}:8001/openai"
    api_key: ${MOCK_KEY:-}
    connect_timeout_s: "${CONNECT_S:-2.5}"
routes:
  - model: demo-model
    targets:
      - {upstream: mock, model: "price-$${USD}", weight: 100}
"""


def test_interpolation_with_defaults() -> None:
    config = load(INTERPOLATED, env={"MOCK_HOST": "10.0.0.7"})
    assert config.listen.address == "127.0.0.1:8080"
    assert config.listen.backlog == 512
    assert config.upstreams["mock"].url == "http://10.0.0.7:8001/openai"
    assert config.upstreams["mock"].api_key == ""
    assert config.upstreams["mock"].connect_timeout_s == 2.5
    assert config.routes[0].targets[0].model == "price-${USD}"


def test_interpolation_with_variables_set() -> None:
    env = {"HOST": "0.0.0.0", "PORT": "9000", "BACKLOG": "64", "MOCK_HOST": "mock", "MOCK_KEY": "sk-1"}
    config = load(INTERPOLATED, env=env)
    assert config.listen.address == "0.0.0.0:9000"
    assert config.listen.backlog == 64
    assert config.upstreams["mock"].api_key == "sk-1"


def test_interpolation_of_a_set_but_empty_variable_uses_the_default() -> None:
    config = load(INTERPOLATED, env={"MOCK_HOST": "mock", "BACKLOG": ""})
    assert config.listen.backlog == 512


def test_interpolated_value_is_type_checked() -> None:
    assert problems(INTERPOLATED, env={"MOCK_HOST": "mock", "BACKLOG": "lots"}) == [
        "config.yaml:3: listen.backlog: must be an integer, got 'lots'"
    ]


def test_unset_variable_without_default() -> None:
    assert problems(INTERPOLATED) == [
        "config.yaml:6: upstreams.mock.url: environment variable MOCK_HOST is not set"
        " (write ${MOCK_HOST:-default} to give a default)"
    ]


def test_bad_variable_reference() -> None:
    text = MINIMAL + "default_upstream: ${mock upstream}\n"
    assert problems(text) == [
        "config.yaml:8: default_upstream: bad reference '${mock upstream}': write ${NAME} or"
        " ${NAME:-default} (and $${ for a literal ${)"
    ]


# -- several problems at once ---------------------------------------------------------------------


def test_all_problems_are_reported_together_in_line_order() -> None:
    text = """\
    listen: {address: "127.0.0.1:8080", backlog: zero}
    upstreams:
      mock: {url: "http://127.0.0.1:8001", max_pending: many}
    routes:
      - model: demo-model
        targets:
          - {upstream: mock, model: mock-model-v1, weigth: 100}
    log: {level: loud}
    """
    with pytest.raises(ConfigError) as info:
        load(text)
    expected = [
        "config.yaml:1: listen.backlog: must be an integer, got 'zero'",
        "config.yaml:3: upstreams.mock.max_pending: must be an integer, got 'many'",
        "config.yaml:7: routes[0].targets[0].weigth: unknown key 'weigth' (did you mean 'weight'?)",
        "config.yaml:8: log.level: must be one of: debug, info, warning, error",
    ]
    assert info.value.problems == expected
    assert str(info.value) == "\n".join(expected)


# -- validate(): cross-field and cross-reference checks -----------------------------------------------


def test_cross_reference_checks() -> None:
    text = """\
    upstreams:
      vllm-a: {url: "http://127.0.0.1:8001"}
      vllm-b: {url: "http://127.0.0.1:8002"}
    default_upstream: vllm-c
    routes:
      - model: chat
        targets:
          - {upstream: vllm-a, model: llama-v1, weight: 95}
          - {upstream: vllm-x, model: llama-v2, weight: 5}
      - model: chat
        targets: [{upstream: vllm-b, model: llama-v1}]
    """
    assert problems(text) == [
        "config.yaml:4: default_upstream: unknown upstream 'vllm-c'; known: vllm-a, vllm-b",
        "config.yaml:9: routes[0].targets[1].upstream: unknown upstream 'vllm-x'; known: vllm-a, vllm-b",
        "config.yaml:10: routes[1].model: duplicate of routes[0].model",
    ]


def test_field_validate_checks() -> None:
    text = """\
    listen: {address: "localhost"}
    upstreams:
      mock:
        url: "ftp://127.0.0.1:8001"
    routes:
      - model: demo-model
        targets:
          - {upstream: mock, model: mock-model-v1, weight: 0}
          - {upstream: mock, model: mock-model-v2, weight: 0}
    """
    assert problems(text) == [
        "config.yaml:1: listen.address: must be host:port, got 'localhost'",
        "config.yaml:4: upstreams.mock.url: scheme must be http or https, got 'ftp://127.0.0.1:8001'",
        "config.yaml:7: routes[0].targets: at least one target needs a weight > 0",
    ]


@pytest.mark.parametrize(
    ("url", "instead"),
    [
        ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000"),
        ("https://example.com/openai/v1", "https://example.com/openai"),
    ],
)
def test_an_upstream_url_ending_in_v1_is_a_problem_that_says_what_to_write(url: str, instead: str) -> None:
    """The SDK's base URL ends in /v1, the upstream url must not: the client's path (/v1/...) goes
    after the url's path, so every request would go to /v1/v1/..."""
    text = f"""\
    upstreams:
      mock:
        url: "{url}"
    routes:
      - {{model: demo-model, targets: [{{upstream: mock, model: m}}]}}
    """
    assert problems(text) == [
        f"config.yaml:3: upstreams.mock.url: must not end in /v1: the client's path (/v1/...) is sent "
        f"after it, so requests would go to /v1/v1/...; write {instead!r}"
    ]


def test_an_upstream_url_with_another_prefix_is_fine() -> None:
    for url in ("http://127.0.0.1:8000", "https://example.com/openai", "http://h:1/v1beta", "http://h:1/v10"):
        config = load(WITHOUT_LISTEN.replace("http://127.0.0.1:8001", url))
        assert config.upstreams["mock"].url == url


def test_validate_is_skipped_when_the_fields_have_problems() -> None:
    text = """\
    upstreams:
      mock: {url: "ftp://127.0.0.1:8001", max_pending: -1}
    routes:
      - {model: demo-model, targets: [{upstream: nope, model: m}]}
      - {model: demo-model, targets: [{upstream: mock, model: m, weight: x}]}
    """
    assert problems(text) == [
        "config.yaml:2: upstreams.mock.max_pending: must be an integer ≥ 0",
        "config.yaml:5: routes[1].targets[0].weight: must be a number, got 'x'",
    ]


# -- middleware ---------------------------------------------------------------------------------------


def test_custom_middleware_is_resolved_and_its_options_built() -> None:
    text = MINIMAL + textwrap.dedent(
        f"""\
        middleware:
          - type: "{SAMPLE}"
            header: x-canary
            ratio: 0
            tags: [a, b]
            per_model: {{demo-model: 3}}
            extra:
              retries: [1, "${{RETRY:-two}}", 2.5]
              nested: {{flag: true, none: null}}
          - {{type: "{SAMPLE}", header: "${{HEADER:-x-second}}"}}
        """
    )
    config = load(text)
    first, second = config.middleware
    assert first == MiddlewareEntry(
        type=SAMPLE,
        config=SampleConfig(
            header="x-canary",
            ratio=0.0,
            tags=("a", "b"),
            per_model={"demo-model": 3},
            extra={"retries": [1, "two", 2.5], "nested": {"flag": True, "none": None}},
        ),
        factory=Sample,
    )
    assert second.config == SampleConfig(header="x-second")
    assert second.factory is Sample


def test_middleware_unknown_type() -> None:
    text = MINIMAL + "middleware:\n  - {type: rate_limiter, requests_per_minute: 600}\n"
    builtin = ", ".join(sorted(registry.BUILTIN))
    assert problems(text) == [
        f"config.yaml:9: middleware[0].type: unknown middleware type 'rate_limiter'; built-in: {builtin};"
        " or 'package.module:Class' for your own"
    ]


def test_middleware_module_that_cannot_be_imported() -> None:
    text = MINIMAL + "middleware:\n  - type: tests.unit.no_such_module:Thing\n"
    assert problems(text) == [
        "config.yaml:9: middleware[0].type: cannot import 'tests.unit.no_such_module' for middleware"
        " 'tests.unit.no_such_module:Thing': ModuleNotFoundError: No module named 'tests.unit.no_such_module'"
    ]


def test_middleware_unknown_option() -> None:
    text = MINIMAL + f"middleware:\n  - type: {SAMPLE}\n    header: x-a\n    ration: 0.1\n"
    assert problems(text) == [
        "config.yaml:11: middleware[0].ration: unknown key 'ration' (did you mean 'ratio'?)"
    ]


def test_middleware_entry_problems() -> None:
    text = MINIMAL + textwrap.dedent(
        f"""\
        middleware:
          - {{header: x-a}}
          - {SAMPLE}
          - {{type: "{SAMPLE}"}}
          - {{type: "{SAMPLE}", header: X-Upper, per_model: {{m: many}}}}
          - {{type: "{SAMPLE}", header: X-Upper}}
        """
    )
    assert problems(text) == [
        "config.yaml:9: middleware[0].type: required",
        "config.yaml:10: middleware[1]: must be a mapping",
        "config.yaml:11: middleware[2].header: required",
        "config.yaml:12: middleware[3].per_model.m: must be an integer, got 'many'",
        "config.yaml:13: middleware[4].header: must be lower-case",
    ]
