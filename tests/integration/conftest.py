"""Shared fixtures: one mock backend and one sidecar (minimal config) per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.mock_proc import MockProcess
from tests.integration.sidecar_proc import SidecarProcess, minimal_config


@pytest.fixture(scope="module")
def mock() -> Iterator[MockProcess]:
    with MockProcess() as proc:
        yield proc


@pytest.fixture(scope="module")
def sidecar(mock: MockProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """The sidecar with the issue's minimal config, in front of ``mock``."""
    with SidecarProcess(minimal_config(mock.url), tmp_path_factory.mktemp("sidecar")) as proc:
        yield proc
