"""Helpers shared by test modules (the fixtures live in conftest.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import pytest

from gateway import Timeouts

# Fast failure detection in tests: a lost worker is noticed within 2 s.
TEST_TIMEOUTS = Timeouts(heartbeat_interval_s=0.25, heartbeat_timeout_s=2.0, orphan_grace_s=2.0)


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
