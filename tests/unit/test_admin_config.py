"""The ``admin`` section: its defaults, ${ENV} in the token, and the addresses it refuses."""

from __future__ import annotations

import dataclasses
import re
import textwrap
from pathlib import Path

import pytest

from proxy.config import AdminConfig, Config
from proxy.config_loader import ConfigError, load_config_text

MINIMAL = """\
listen: {address: "127.0.0.1:8080"}
upstreams:
  mock: {url: "http://127.0.0.1:8001"}
routes:
  - {model: demo-model, targets: [{upstream: mock, model: mock-model-v1}]}
"""
README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def load(text: str, env: dict[str, str] | None = None) -> Config:
    return load_config_text(MINIMAL + textwrap.dedent(text), "config.yaml", env or {})


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(text)
    return info.value.problems


def test_the_defaults() -> None:
    admin = load("").admin
    assert admin == AdminConfig()
    assert (admin.enabled, admin.host, admin.port, admin.token) == (True, "127.0.0.1", 9090, "")
    assert admin.duration_buckets_s == (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def test_the_token_from_the_environment_and_buckets_of_ones_own() -> None:
    admin = load(
        'admin: {address: "[::1]:9100", token: "${TOKEN}", duration_buckets_s: [1, 2.5, 30]}\n',
        {"TOKEN": "t0k"},
    ).admin
    assert (admin.host, admin.port, admin.token) == ("::1", 9100, "t0k")
    assert admin.duration_buckets_s == (1.0, 2.5, 30.0)


@pytest.mark.parametrize(
    ("admin", "message"),
    [
        ('{address: "127.0.0.1:8080"}', "config.yaml:6: admin.address: '127.0.0.1:8080' is where the proxy"),
        ('{address: "0.0.0.0:8080"}', "admin.address: '0.0.0.0:8080' is where the proxy listens"),
        ('{address: "nohost"}', "admin.address: must be host:port, got 'nohost'"),
        ('{address: "127.0.0.1:99999"}', "admin.address: port must be a number 0-65535"),
        ("{duration_buckets_s: [1, 0.5]}", "admin.duration_buckets_s: must be > 0 and increasing"),
        ("{duration_buckets_s: [0, 1]}", "admin.duration_buckets_s: must be > 0 and increasing"),
        ("{duration_buckets_s: []}", "admin.duration_buckets_s:"),
        ("{port: 9}", "admin.port:"),
    ],
)
def test_bad_admin_sections_are_refused(admin: str, message: str) -> None:
    found = problems(f"admin: {admin}\n")
    assert any(message in p for p in found), found


def test_port_0_on_both_and_admin_off_never_collide() -> None:
    text = MINIMAL.replace("8080", "0")
    config = load_config_text(text + 'admin: {address: "127.0.0.1:0"}\n', "config.yaml", {})
    assert config.admin.port == 0
    assert not load('admin: {enabled: false, address: "127.0.0.1:8080"}\n').admin.enabled


def test_the_readme_names_every_admin_key() -> None:
    reference = README.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    missing = [
        f.name for f in dataclasses.fields(AdminConfig) if not re.search(rf"admin\.{f.name}\b", reference)
    ]
    assert not missing, f"README's configuration reference does not mention admin.{missing}"
