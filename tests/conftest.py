"""Shared fixtures: real local clusters (gateway + worker processes) on loopback ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import pilot
from tests_support import TEST_TIMEOUTS


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No test reads or writes the user's ~/.pilot."""
    monkeypatch.setenv("PILOT_HOME", str(tmp_path_factory.mktemp("pilot-home")))
    monkeypatch.delenv("PILOT_CONNECT", raising=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[pilot.LocalCluster]:
    """Two workers of one slot each, shared by a module's tests."""
    with pilot.LocalCluster(workers=2, timeouts=TEST_TIMEOUTS) as c:
        yield c


@pytest.fixture(scope="module")
def client(cluster: pilot.LocalCluster) -> pilot.Client:
    return cluster.client()
