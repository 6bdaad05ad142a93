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


def test_the_admin_listeners_libraries_load_only_with_it() -> None:
    """aiohttp and prometheus_client cost ~15 MiB of RSS: a sidecar with admin.enabled: false (and
    anything that imports the core) does without them."""
    import subprocess
    import sys

    code = (
        "import sys, proxy.cli, proxy.app; print(sorted({'aiohttp', 'prometheus_client'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
