"""What the installed wheel holds: the product (proxy, middleware and their subpackages), not the
bench/ tools that run from the checkout; and no declared dependency the product does not import."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from setuptools import find_packages  # type: ignore[import-untyped]

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_wheel_has_the_product_and_not_the_bench() -> None:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = set(find_packages(where=str(ROOT), include=include))
    assert {
        "proxy",
        "proxy.server",
        "proxy.upstream",
        "proxy.h2",
        "middleware",
        "middleware.rate_limit",
    } <= packages
    assert not {p for p in packages if p.split(".")[0] not in ("proxy", "middleware")}, packages


def test_every_declared_dependency_is_imported_by_the_product() -> None:
    sources = "\n".join(p.read_text() for d in ("proxy", "middleware") for p in (ROOT / d).rglob("*.py"))
    imported = set(re.findall(r"^\s*(?:from|import)\s+(\w+)", sources, re.M))
    declared = {
        re.split(r"[<>=\[ ]", d)[0].lower().replace("-", "_") for d in PYPROJECT["project"]["dependencies"]
    }
    unused = {d for d in declared if d.replace("pyyaml", "yaml") not in imported}
    assert not unused, f"declared but never imported by proxy/ or middleware/: {sorted(unused)}"


def _modules_loaded(code: str) -> list[str]:
    import subprocess
    import sys

    code += "\nprint(sorted({'aiohttp', 'prometheus_client'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    loaded: list[str] = eval(out.stdout.strip().splitlines()[-1])
    return loaded


_APP = """
import asyncio, sys
from proxy.app import App
from proxy.config_loader import load_config_text
config = load_config_text('''
upstreams: {m: {url: "http://127.0.0.1:1"}}
routes: [{model: a, targets: [{upstream: m, model: a}]}]
admin: {enabled: %s, address: "127.0.0.1:0"}
''')
App(config, asyncio.new_event_loop())
"""


def test_prometheus_client_loads_only_with_the_admin_listener() -> None:
    """prometheus_client costs ~4 MiB of RSS: a sidecar with admin.enabled: false (and anything that
    imports the core) does without it. aiohttp (~16 MiB, the mock's server) the product never
    loads, the admin listener included: that runs on the sidecar's own HTTP/1.1 front."""
    assert _modules_loaded("import sys, proxy.cli, proxy.app") == []
    assert _modules_loaded(_APP % "false") == []
    assert _modules_loaded(_APP % "true") == ["prometheus_client"]
