"""Shared fixtures: real local clusters (gateway + worker processes) on loopback ports."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

import pilot
from gateway import Timeouts

# Fast failure detection in tests: a lost worker is noticed within 2 s.
TEST_TIMEOUTS = Timeouts(heartbeat_interval_s=0.25, heartbeat_timeout_s=2.0, orphan_grace_s=2.0)


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


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll ``predicate`` until true, failing the test past ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)  # a poll interval under a deadline, not a wait for start-up


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
