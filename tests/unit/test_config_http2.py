"""The HTTP/2 and TLS config: defaults, bounds and the TLS files checked at load, with file:line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from proxy.config import Config, Http2Config, TlsConfig
from proxy.config_loader import ConfigError, load_config_text
from tests.tls_cert import self_signed

# Seven lines, as in test_config.py: what a test appends starts at line 8.
MINIMAL = """\
upstreams:
  mock: {url: "http://127.0.0.1:8001"}
routes:
  - model: demo-model
    targets:
      - {upstream: mock, model: mock-model-v1, weight: 100}
listen: {address: "127.0.0.1:8080"}
"""
WITHOUT_LISTEN = MINIMAL.rsplit("listen:", 1)[0]  # six lines: a test's listen: starts at line 7


def load(text: str) -> Config:
    return load_config_text(textwrap.dedent(text), "config.yaml", {})


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text)
    return info.value.problems


def test_http2_is_on_by_default_with_safe_limits() -> None:
    config = load(MINIMAL)
    assert config.http2 == Http2Config()
    h2 = config.http2
    assert h2.enabled
    assert h2.max_concurrent_streams == 100
    assert h2.initial_window_size > 65535  # sized for long streams, not the protocol's 64 KiB
    assert config.listen.tls is None


def test_http2_keys_are_read() -> None:
    config = load(
        MINIMAL
        + "http2:\n  enabled: false\n  max_concurrent_streams: 8\n  rapid_reset_limit: 5\n"
        + "  control_frame_window_s: 2.5\n  stream_buffer_bytes: 4096\n"
    )
    h2 = config.http2
    assert (h2.enabled, h2.max_concurrent_streams, h2.rapid_reset_limit) == (False, 8, 5)
    assert (h2.control_frame_window_s, h2.stream_buffer_bytes) == (2.5, 4096)


def test_http2_bad_values_name_file_line_and_key() -> None:
    text = MINIMAL + (
        "http2:\n"
        "  max_concurrent_streams: 0\n"
        "  initial_window_size: 100\n"
        "  rapid_reset_window_s: -1\n"
        "  max_streams: 4\n"
        "  enabled: maybe\n"
    )
    assert problems(text) == [
        "config.yaml:9: http2.max_concurrent_streams: must be an integer ≥ 1",
        "config.yaml:10: http2.initial_window_size: must be an integer ≥ 65535",
        "config.yaml:11: http2.rapid_reset_window_s: must be a number ≥ 0.001",
        "config.yaml:12: http2.max_streams: unknown key 'max_streams'"
        " (did you mean 'max_concurrent_streams'?)",
        "config.yaml:13: http2.enabled: must be true or false, got 'maybe'",
    ]


def test_window_sizes_stay_within_the_protocol() -> None:
    assert problems(MINIMAL + "http2: {connection_window_size: 2147483648}\n") == [
        "config.yaml:8: http2.connection_window_size: must be an integer ≤ 2147483647"
    ]


def test_tls_loads_a_cert_and_key(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    config = load(
        WITHOUT_LISTEN + f'listen:\n  address: "127.0.0.1:0"\n  tls: {{cert: "{cert}", key: "{key}"}}\n'
    )
    assert config.listen.tls == TlsConfig(cert=str(cert), key=str(key))


def test_tls_files_that_cannot_be_read(tmp_path: Path) -> None:
    text = WITHOUT_LISTEN + (f'listen:\n  tls:\n    cert: "{tmp_path}/missing.pem"\n    key: "{tmp_path}"\n')
    assert problems(text) == [
        f"config.yaml:9: listen.tls.cert: cannot read '{tmp_path}/missing.pem': No such file or directory",
        f"config.yaml:10: listen.tls.key: cannot read '{tmp_path}': Is a directory",
    ]


def test_tls_key_that_does_not_match_the_cert(tmp_path: Path) -> None:
    cert, _ = self_signed(tmp_path, "one")
    _, other_key = self_signed(tmp_path, "two")
    text = WITHOUT_LISTEN + f'listen:\n  tls: {{cert: "{cert}", key: "{other_key}"}}\n'
    [problem] = problems(text)
    assert problem.startswith(f"config.yaml:8: listen.tls: cannot use '{cert}' with '{other_key}': ")
    assert "KEY_VALUES_MISMATCH" in problem


def test_tls_needs_both_files() -> None:
    assert problems(WITHOUT_LISTEN + 'listen:\n  tls: {cert: "server.pem"}\n') == [
        "config.yaml:8: listen.tls.key: required"
    ]
